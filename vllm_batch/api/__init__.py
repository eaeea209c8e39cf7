"""The HTTP API: OpenAI's files, uploads and batches routes, health, metrics, the dashboard."""
