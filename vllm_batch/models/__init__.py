"""The served models: what each kind serves, and LoRA adapters on top of them."""
