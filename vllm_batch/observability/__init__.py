"""Observability: Prometheus metrics and the GPU health guard."""
