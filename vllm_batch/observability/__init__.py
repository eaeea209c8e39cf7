"""Observability: Prometheus metrics (``/metrics``), vLLM's engine stats, the GPU guard."""
