"""Observability: Prometheus metrics (``/metrics``) and vLLM's engine stats."""
