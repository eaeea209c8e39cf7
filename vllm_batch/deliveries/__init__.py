"""The delivery outbox's runner: webhooks and result handlers for finished batches."""
