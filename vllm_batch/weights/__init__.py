"""Model weights made on this machine: the default SmolLM2 model and tiny test models."""
