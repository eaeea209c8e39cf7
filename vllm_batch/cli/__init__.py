"""``vllm-batch``: serve, worker, run, webhook-secret, models, bench; and the client commands
``batches`` and ``files`` (``client_*.py``: any OpenAI-compatible Batch API).

``commands.py`` is the typer app and ``main``; ``options.py`` the one options model (each flag
declared once); one module per command.
"""

from vllm_batch.cli.commands import app, main

__all__ = ["app", "main"]
