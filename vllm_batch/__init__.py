"""vLLM Batch Server: an OpenAI-compatible Batch API on your own GPUs."""

__version__ = "0.1.0"
