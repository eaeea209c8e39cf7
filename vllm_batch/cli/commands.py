"""The ``vllm-batch`` typer app: its commands, ``--version``, and the entry point ``main``.

vLLM and torch are imported only inside the commands that need them, so ``--help`` is
instant.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import typer

from vllm_batch.cli.bench import bench
from vllm_batch.cli.client_batches import batches_app
from vllm_batch.cli.client_files import files_app
from vllm_batch.cli.embedded_worker import embedded_worker
from vllm_batch.cli.models import models_app
from vllm_batch.cli.run import run, run_and_exit
from vllm_batch.cli.serve import serve
from vllm_batch.cli.webhook_secret import webhook_secret
from vllm_batch.cli.worker import worker
from vllm_batch.engines.start_method import allow_fork

PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}

app = typer.Typer(
    help="vLLM Batch Server: an OpenAI-compatible Batch API on your own GPUs.",
    no_args_is_help=True,
    add_completion=True,
)


def package_version() -> str:
    """The installed ``vllm-batch`` distribution's version."""
    try:
        return version("vllm-batch")
    except PackageNotFoundError:  # a source tree on PYTHONPATH, never installed
        return "unknown"


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"vllm-batch {package_version()}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=show_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """vLLM Batch Server: an OpenAI-compatible Batch API on your own GPUs."""


app.command()(serve)
app.command("worker")(worker)
app.command("embedded-worker", hidden=True)(embedded_worker)
app.command("webhook-secret")(webhook_secret)
app.add_typer(models_app, name="models")
app.add_typer(batches_app, name="batches")
app.add_typer(files_app, name="files")
app.command("run", context_settings=PASS_THROUGH)(run)
app.command(context_settings=PASS_THROUGH, add_help_option=False)(bench)


ENGINE_COMMANDS = frozenset({"serve", "worker", "embedded-worker", "run"})
"""The commands that start vLLM engines in their own process."""


def dashed(arg: str) -> str:
    """``--max_num_seqs`` and ``--max_num_seqs=4`` as ``--max-num-seqs`` (``=4``): vLLM takes
    both spellings of a flag, so do we. Values, and anything not a long flag, stay as given."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg.partition("=")
    return name.replace("_", "-") + eq + value


def main() -> None:
    """The ``vllm-batch`` console script (and ``python -m vllm_batch.cli``)."""
    sys.argv[1:] = [dashed(arg) for arg in sys.argv[1:]]
    if sys.argv[1:2] and sys.argv[1] in ENGINE_COMMANDS:
        allow_fork()  # this process has run no torch work: its first engine may fork
    if sys.argv[1:2] == ["run"]:
        run_and_exit(app)
    app()
