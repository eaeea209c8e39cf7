"""``vllm-batch``: serve, worker, run, webhook-secret, models, bench.

``commands.py`` is the typer app and ``main``; ``options.py`` the one options model (each flag
declared once); one module per command.
"""

from vllm_batch.cli.commands import app, main

__all__ = ["app", "main"]
