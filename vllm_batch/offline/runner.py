"""The ``vllm-batch run`` loop: pre-flight (while the engine starts), in-order output, upload.

Requests take the server's path (``Dispatcher`` → ``execute_line`` → engine), so output
bodies are the bytes the server would produce; error lines use ``vllm run-batch``'s shape.

A local output is written to ``<output>.partial`` and renamed to ``<output>`` only once every
request is in it, so ``<output>`` never holds a partial result; after an interruption,
``--resume`` continues the ``.partial`` file. A URL output is uploaded only when complete.
The output is published before the engine stops.
http(s) locations are logged and reported without their query string (pre-signed URLs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import anyio

from vllm_batch import engines
from vllm_batch.config import ModelSpec, Settings
from vllm_batch.engines.engine import Engine, EngineFailure, EngineResult
from vllm_batch.models.adapters import adapter_bases
from vllm_batch.net.media_url import MediaGuard
from vllm_batch.offline import io
from vllm_batch.offline.preflight import describe, preflight, strict_errors
from vllm_batch.offline.progress import Progress, RunStats, make_progress
from vllm_batch.offline.run_metrics import (
    MetricsAddress,
    MetricsUnavailable,
    RunMetrics,
    run_metrics,
)
from vllm_batch.offline.writer import DEFAULT_MAX_BUFFERED, OrderedWriter
from vllm_batch.pipeline.dispatch import Dispatcher
from vllm_batch.pipeline.input import iter_lines
from vllm_batch.pipeline.line_result import LineResult
from vllm_batch.pipeline.output import ErrorShape

log = logging.getLogger(__name__)

EXIT_FAILED = 1
"""Unreadable input, failed upload, engine failure, interrupted run."""
EXIT_BAD_INPUT = 2
"""Structurally invalid input, ``--strict`` validation errors, ``--resume`` mismatch, usage."""
TICK_SECONDS = 0.5
PARTIAL_SUFFIX = ".partial"

EngineFactory = Callable[[ModelSpec, Settings], Engine]
VLLM_URL_ALIASES = {"/score": "/v1/score", "/rerank": "/v1/rerank", "/v2/rerank": "/v1/rerank"}
"""Other spellings of the pooling endpoints that ``vllm run-batch`` (and ``vllm serve``) take."""


class RunFailed(Exception):
    """The run cannot finish; ``exit_code`` says why (see ``EXIT_*``)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


@dataclass(frozen=True)
class RunOptions:
    input: str
    output: str
    spec: ModelSpec
    settings: Settings
    output_tmp_dir: str | None = None
    strict: bool = False
    resume: bool = False
    progress_interval: float = 5.0
    progress_tty: bool | None = None
    max_buffered: int = DEFAULT_MAX_BUFFERED
    """Most finished results held in memory waiting for an earlier line (then reading pauses)."""
    metrics: MetricsAddress | None = None
    """Serve Prometheus ``/metrics`` here while the run lasts (``--enable-metrics``)."""


@dataclass(frozen=True)
class RunSummary:
    total: int
    resumed: int
    finished: int
    errors: int
    output_tokens: int
    seconds: float
    peak_buffered: int = 0


class ServedModelGuard:
    """Answers lines for another model with vLLM's 404 without sending them to the engine,
    and sends ``VLLM_URL_ALIASES`` to the endpoints they name.

    The served model's LoRA ``adapters`` (names) are served too.
    """

    def __init__(self, engine: Engine, adapters: Sequence[str] = ()) -> None:
        self.engine = engine
        self.model_name = engine.model_name
        self.names = {engine.model_name, *adapters}

    @property
    def max_in_flight(self) -> int:
        return self.engine.max_in_flight

    async def start(self) -> None:
        await self.engine.start()

    async def stop(self) -> None:
        await self.engine.stop()

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> EngineResult:
        model = body.get("model")
        if model is not None and model not in self.names:
            from vllm_batch.engines.vllm_engine import error_result

            served = ", ".join(sorted(self.names - {self.model_name}))
            return error_result(
                404,
                "NotFoundError",
                f"The model `{model}` does not exist. Served model: {self.model_name}"
                + (f" (LoRA adapters: {served})." if served else "."),
                "model",
            )
        return await self.engine.run(VLLM_URL_ALIASES.get(url, url), body, request_id)


def default_engine_factory(spec: ModelSpec, settings: Settings) -> Engine:
    return engines.make_engine(spec, settings)


def iter_requests(path: Path, start: int) -> Generator[tuple[int, bytes], None, None]:
    """``(request_index, raw_line)`` from request ``start`` on (earlier ones are resumed)."""
    with path.open("rb") as handle:
        for index, (_number, _offset, raw) in enumerate(iter_lines(handle)):
            if index >= start:
                yield index, raw


def partial_path(output: Path) -> Path:
    """Where a local output is written until the run is complete."""
    return output.with_name(output.name + PARTIAL_SUFFIX)


def run_batch(options: RunOptions, engine_factory: EngineFactory | None = None) -> RunSummary:
    """Run one batch file end to end; raises ``RunFailed`` with an exit code."""
    io.redact_http_logs()
    temps: list[Path] = []
    try:
        return _run(options, engine_factory or default_engine_factory, temps)
    finally:
        for path in temps:
            path.unlink(missing_ok=True)


def _run(options: RunOptions, engine_factory: EngineFactory, temps: list[Path]) -> RunSummary:
    started = time.monotonic()
    if options.max_buffered < 1:
        raise RunFailed("--max-buffered-results must be at least 1", EXIT_BAD_INPUT)
    remote = io.is_url(options.output)
    if options.resume and remote:
        raise RunFailed("--resume needs a local output path, not a URL", EXIT_BAD_INPUT)
    if not remote:
        _refuse_same_file(options.input, Path(options.output))
    if not io.is_url(options.input) and not Path(options.input).is_file():
        raise RunFailed(f"cannot read input {options.input}: no such file")
    return asyncio.run(_run_with_engine(options, engine_factory, temps, started))


@dataclass(frozen=True)
class Job:
    """The checked input and where the output goes."""

    input_path: Path
    total: int
    resumed: int
    out_path: Path
    final: Path | None
    """The local output ``out_path`` is renamed to; None: ``out_path`` is uploaded."""


async def _run_with_engine(
    options: RunOptions, engine_factory: EngineFactory, temps: list[Path], started: float
) -> RunSummary:
    """Start the engine while the input is fetched and checked; stop it once the output is out.

    An input error is reported as without the engine (which is stopped, mid-start if need be).
    """
    adapters = [a.name for a in options.settings.adapters_of(options.spec.name)]
    async with contextlib.AsyncExitStack() as stack:
        try:
            recorder = await stack.enter_async_context(
                run_metrics(options.metrics, options.settings, options.spec.name)
            )
        except MetricsUnavailable as exc:
            raise RunFailed(str(exc)) from exc
        engine = ServedModelGuard(engine_factory(options.spec, options.settings), adapters)
        starting = asyncio.create_task(_start_engine(engine, recorder), name="engine start")
        try:
            job = await anyio.to_thread.run_sync(_prepare, options, temps)
            return await _process(options, job, engine, starting, temps, started, recorder)
        finally:
            await _stop_engine(engine, starting)
            recorder.engine_stopped()


def _prepare(options: RunOptions, temps: list[Path]) -> Job:
    """Fetch and check the input, find where the output goes (runs while the engine starts)."""
    input_path = _fetch_input(options, temps)
    total, first_url = _check_input(input_path, io.redact(options.input))
    if total and options.strict and first_url is not None:
        spec = options.spec
        adapters = adapter_bases(options.settings.adapters_of(spec.name))
        errors = strict_errors(
            input_path, first_url, [spec.name], {spec.name: spec.resolved_kind}, adapters
        )
        if errors:
            raise RunFailed(describe(errors, len(errors), io.redact(options.input)), EXIT_BAD_INPUT)
    if io.is_url(options.output):
        out_path = _temp_file(options.output_tmp_dir, "vllm_batch_output_")
        temps.append(out_path)
        return Job(input_path, total, 0, out_path, None)
    final = Path(options.output)
    out_path = partial_path(final)
    resumed = 0
    if options.resume:
        resumed = _resume(final, input_path, total)
    elif out_path.exists():
        log.warning("discarding the earlier partial output %s (no --resume)", out_path)
    return Job(input_path, total, resumed, out_path, final)


async def _process(
    options: RunOptions,
    job: Job,
    engine: Engine,
    starting: asyncio.Task[None],
    temps: list[Path],
    started: float,
    recorder: RunMetrics,
) -> RunSummary:
    """Run the requests not yet done into the output and publish it (engine still up)."""
    total, resumed, out_path, final = job.total, job.resumed, job.out_path, job.final
    stats = RunStats(total=total, resumed=resumed)

    def on_result(result: LineResult) -> None:
        stats.add(result)
        recorder.line(result)

    try:
        handle: BinaryIO = out_path.open("ab" if resumed else "wb")
    except OSError as exc:
        raise RunFailed(f"cannot write output {out_path}: {exc}") from exc
    failure: RunFailed | None = None
    with handle:
        writer = OrderedWriter(
            handle, start=resumed, on_result=on_result, max_buffered=options.max_buffered
        )
        try:
            if resumed < total:
                progress = make_progress(
                    stats, interval=options.progress_interval, tty=options.progress_tty
                )
                await starting
                await _execute(
                    engine,
                    job.input_path,
                    writer,
                    progress,
                    options.settings.group_prefixes,
                    read_ahead=options.max_buffered,
                    media=MediaGuard(options.settings.media_allowed_hosts),
                )
        except RunFailed as exc:
            failure = exc
        finally:
            writer.flush(sync=True)
    if failure is None and writer.next_index < total:
        failure = RunFailed("stopped early")
    if failure is not None:
        done = f"{failure.message} ({writer.next_index} of {total} requests done)"
        if final is None:
            raise RunFailed(f"{done}; nothing was uploaded", failure.exit_code)
        raise RunFailed(
            f"{done}; the partial output is {out_path}: rerun with --resume to continue",
            failure.exit_code,
        )
    if final is not None:
        _publish(out_path, final)
    else:
        try:
            await anyio.to_thread.run_sync(io.upload, out_path, options.output)
        except io.TransferError as exc:
            temps.remove(out_path)
            raise RunFailed(f"{exc}; the output is kept at {out_path}") from exc
    log.info("peak reorder buffer: %d results", writer.peak_buffered)
    return RunSummary(
        total=total,
        resumed=resumed,
        finished=stats.finished,
        errors=stats.errors,
        output_tokens=stats.output_tokens,
        seconds=time.monotonic() - started,
        peak_buffered=writer.peak_buffered,
    )


async def _start_engine(engine: Engine, recorder: RunMetrics) -> None:
    try:
        await engine.start()
    except Exception as exc:
        raise RunFailed(f"could not start the engine: {exc}") from exc
    recorder.engine_started()


async def _stop_engine(engine: Engine, starting: asyncio.Task[None]) -> None:
    """Stop the engine, cancelling its start if it is still starting (input error, no work)."""
    starting.cancel()
    await asyncio.wait([starting])
    if not starting.cancelled() and starting.exception() is not None:
        log.debug("the engine start failed: %s", starting.exception())
    await engine.stop()


def _refuse_same_file(input_location: str, output: Path) -> None:
    """Refuse an output (or its ``.partial``) that is the input file, however it is spelled."""
    if io.is_url(input_location):
        return
    source = Path(input_location)
    for candidate in (output, partial_path(output)):
        try:
            same = source.exists() and candidate.exists() and os.path.samefile(source, candidate)
        except OSError:
            same = False
        if same:
            raise RunFailed(
                f"the output {output} is the input file {input_location}: "
                "writing it would destroy the input; choose another output path",
                EXIT_BAD_INPUT,
            )


def _publish(partial: Path, final: Path) -> None:
    """Give the complete output its name (atomically) and make the rename durable."""
    try:
        partial.replace(final)
        directory = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as exc:
        raise RunFailed(f"cannot rename {partial} to {final}: {exc}") from exc


def _temp_file(directory: str | None, prefix: str) -> Path:
    try:
        return io.temp_path(directory, prefix)
    except OSError as exc:
        where = directory or "the temporary directory"
        raise RunFailed(f"cannot create a temporary file in {where}: {exc}") from exc


def _check_input(path: Path, name: str) -> tuple[int, str | None]:
    """The structural pre-flight: ``(request count, first url)`` or ``RunFailed``."""
    try:
        with path.open("rb") as source:
            check = preflight(source)
    except OSError as exc:
        raise RunFailed(f"cannot read input {name}: {exc}") from exc
    if not check.ok:
        raise RunFailed(describe(check.errors, check.bad_lines, name), EXIT_BAD_INPUT)
    log.info("input %s: %d requests", name, check.total)
    return check.total, check.first_url


def _resume(final: Path, input_path: Path, total: int) -> int:
    """Requests already in ``<final>.partial`` (or in ``final``, which then becomes it)."""
    partial = partial_path(final)
    # ``final`` itself: an already complete output, or one from a version that wrote in place.
    source = final if not partial.exists() and final.exists() else partial
    try:
        done = io.scan_resume(source, input_path) if total else 0
        if source == final:
            final.replace(partial)
    except io.ResumeMismatch as exc:
        raise RunFailed(f"cannot resume {source}: {exc}", EXIT_BAD_INPUT) from exc
    except OSError as exc:
        raise RunFailed(f"cannot resume {source}: {exc}") from exc
    log.info("resuming: %d of %d requests already in %s", done, total, source)
    return done


def _fetch_input(options: RunOptions, temps: list[Path]) -> Path:
    if not io.is_url(options.input):
        path = Path(options.input)
        if not path.is_file():
            raise RunFailed(f"cannot read input {options.input}: no such file")
        return path
    path = _temp_file(options.output_tmp_dir, "vllm_batch_input_")
    temps.append(path)
    try:
        io.download(options.input, path)
    except io.TransferError as exc:
        raise RunFailed(str(exc)) from exc
    return path


async def _execute(
    engine: Engine,
    input_path: Path,
    writer: OrderedWriter,
    progress: Progress,
    group_prefixes: bool = True,
    *,
    read_ahead: int | None = None,
    media: MediaGuard | None = None,
) -> None:
    """Push every remaining line through the dispatcher into ``writer`` (engine started).

    Lines are put in prefix order ``read_ahead`` lines at a time (the reorder buffer's
    size, so a whole block fits under the writer's horizon).
    """
    token = uuid.uuid4().hex[:12]
    dispatcher = Dispatcher(
        engine,
        writer.add,
        lambda index: f"vllm-batch-{token}-{index}",
        group_prefixes=group_prefixes,
        horizon=writer.horizon,
        error_shape=ErrorShape.VLLM,
        read_ahead=read_ahead,
        media=media,
    )
    lines = iter_requests(input_path, writer.next_index)
    progress.start()
    ticker = asyncio.create_task(_tick(writer, progress))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _interrupt, loop, dispatcher, sig)
    try:
        await dispatcher.run(lines)
    except EngineFailure as exc:
        raise RunFailed(f"the engine failed: {exc}") from exc
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        await anyio.to_thread.run_sync(lines.close)
        writer.flush()
        progress.close()


def _interrupt(
    loop: asyncio.AbstractEventLoop, dispatcher: Dispatcher, sig: signal.Signals
) -> None:
    log.warning("%s: stopping early; the output so far is kept, marked partial", sig.name)
    loop.remove_signal_handler(sig)  # a second signal acts as usual
    dispatcher.halt()


async def _tick(writer: OrderedWriter, progress: Progress) -> None:
    while True:
        await asyncio.sleep(TICK_SECONDS)
        writer.flush()
        progress.tick()
