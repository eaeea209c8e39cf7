"""Model preparation helpers: the default SmolLM2 model and a tiny random test model."""
