"""``vllm-batch run``: one batch file offline, a drop-in for ``vllm run-batch``."""

from __future__ import annotations

import atexit
import dataclasses
import os
import sys
from typing import NoReturn

import typer

from vllm_batch.cli import options as o
from vllm_batch.cli.build import check_adapters, settings_from, setup_logging
from vllm_batch.config import ModelSpec
from vllm_batch.models.kinds import ModelKind

RUN_FLAGS = (
    o.INPUT_FILE,
    o.OUTPUT_FILE,
    o.MODEL.required(),
    *(f for f in o.ENGINE_FLAGS if f is not o.MODEL),
    o.OUTPUT_TMP_DIR,
    o.STRICT,
    o.RESUME,
    o.PROGRESS_INTERVAL,
    o.MAX_BUFFERED_RESULTS,
    o.RUNNER,
    o.ENABLE_METRICS,
    o.HOST,
    o.PORT,
    o.URL,
    o.ENABLE_PROMPT_TOKENS_DETAILS,
)
METRICS_PORT = 8000
"""``--port``'s default in ``run``, as in vLLM."""


def runner_kind(runner: o.Runner, spec: ModelSpec) -> ModelKind | None:
    """The model kind a ``--runner`` asks for (pooling: score for a cross-encoder, else embed;
    generate: transcribe for a speech-to-text model, which runs on vLLM's generate runner)."""
    detected = spec.resolved_kind
    if runner is o.Runner.generate:
        return ModelKind.TRANSCRIBE if detected is ModelKind.TRANSCRIBE else ModelKind.GENERATE
    if runner is o.Runner.pooling:
        return ModelKind.SCORE if detected is ModelKind.SCORE else ModelKind.EMBED
    return detected


def run_spec(given: o.Given) -> ModelSpec:
    """The one model of the run: the last ``--model`` (as vLLM), renamed and of its runner."""
    try:
        spec = ModelSpec.parse(given["model"][-1])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--model") from None
    if given["served_model_name"]:
        spec = dataclasses.replace(spec, name=given["served_model_name"])
    runner: o.Runner | None = given["runner"]
    if runner is not None and spec.kind is None:
        spec = dataclasses.replace(spec, kind=runner_kind(runner, spec))
    return spec


@o.command(*RUN_FLAGS, context=True)
def run(ctx: typer.Context, given: o.Given) -> None:
    """Run one batch file offline, like `vllm run-batch` (output in input order).

    A local output is written to OUTPUT.partial and renamed to OUTPUT once complete:
    OUTPUT never holds a partial result.

    If the run stops early (Ctrl-C, SIGTERM, engine failure, kill), OUTPUT.partial
    stays and --resume continues it. A URL output is uploaded only when complete.

    The output may not be the input file. URL query strings are never logged.
    """
    from vllm_batch.offline import RunFailed, RunOptions, run_batch
    from vllm_batch.offline.io import redact
    from vllm_batch.offline.run_metrics import MetricsAddress
    from vllm_batch.offline.vllm_flags import unsupported_message

    if ctx.args:
        typer.echo(unsupported_message(ctx.args), err=True)
        raise typer.Exit(2)
    if given["url"] is not None:
        typer.echo("warning: --url is deprecated (as in vLLM); use --host", err=True)
        given.values["host"] = given["url"]
    spec = run_spec(given)
    # The run's model is ``spec``; VLLM_BATCH_HOST/PORT matter only to --enable-metrics.
    settings = settings_from(given, exclude=("model", "port"))
    if settings.engine == "instant-benchmark":
        raise typer.BadParameter("use 'vllm' or 'openai' with `run`", param_hint="--engine")
    check_adapters(settings, [spec.name])
    setup_logging(settings)
    port = METRICS_PORT if given["port"] is None else given["port"]
    options = RunOptions(
        input=given["input_file"],
        output=given["output_file"],
        spec=spec,
        settings=settings,
        output_tmp_dir=given["output_tmp_dir"],
        strict=given["strict"],
        resume=given["resume"],
        progress_interval=given["progress_interval"],
        max_buffered=given["max_buffered_results"],
        metrics=MetricsAddress(settings.host, port) if given["enable_metrics"] else None,
    )
    try:
        summary = run_batch(options)
    except RunFailed as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(exc.exit_code) from None
    typer.echo(
        f"done: {summary.total} requests ({summary.resumed} resumed, {summary.errors} errors) "
        f"in {summary.seconds:.1f}s -> {redact(given['output_file'])}",
        err=True,
    )


def run_and_exit(main: typer.Typer) -> NoReturn:
    """``vllm-batch run``, then exit at once: the output is durable and the engine stopped.

    The atexit hooks run (logging, multiprocessing); tearing the interpreter down after them
    (freeing vLLM's and torch's modules, waiting for an engine start abandoned mid-import)
    takes seconds and has nothing left to save, so it is skipped.
    """
    try:
        main()
        code = 0
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
