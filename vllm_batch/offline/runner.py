"""The ``vllm-batch run`` loop: pre-flight, engine, in-order output, upload.

Requests take the server's path (``Dispatcher`` → ``execute_line`` → engine), so output
bodies are the bytes the server would produce; error lines use ``vllm run-batch``'s shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import anyio

from vllm_batch.config import ModelSpec, Settings
from vllm_batch.engines import make_engine
from vllm_batch.engines.base import Engine, EngineFailure, EngineResult
from vllm_batch.offline import io
from vllm_batch.offline.preflight import describe, preflight, strict_errors
from vllm_batch.offline.progress import Progress, RunStats, make_progress
from vllm_batch.offline.writer import OrderedWriter
from vllm_batch.validation import iter_lines
from vllm_batch.worker.dispatch import Dispatcher

log = logging.getLogger(__name__)

EXIT_FAILED = 1
"""Unreadable input, failed upload, engine failure, interrupted run."""
EXIT_BAD_INPUT = 2
"""Structurally invalid input, ``--strict`` validation errors, ``--resume`` mismatch, usage."""
TICK_SECONDS = 0.5

EngineFactory = Callable[[ModelSpec, Settings], Engine]


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


@dataclass(frozen=True)
class RunSummary:
    total: int
    resumed: int
    finished: int
    errors: int
    output_tokens: int
    seconds: float


class ServedModelGuard:
    """Answers lines for another model with vLLM's 404 without sending them to the engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.model_name = engine.model_name

    @property
    def max_in_flight(self) -> int:
        return self.engine.max_in_flight

    async def start(self) -> None:
        await self.engine.start()

    async def stop(self) -> None:
        await self.engine.stop()

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> EngineResult:
        model = body.get("model")
        if model is not None and model != self.model_name:
            from vllm_batch.engines.vllm_engine import error_result

            return error_result(
                404,
                "NotFoundError",
                f"The model `{model}` does not exist. Served model: {self.model_name}.",
                "model",
            )
        return await self.engine.run(url, body, request_id)


def default_engine_factory(spec: ModelSpec, settings: Settings) -> Engine:
    return make_engine(spec, settings)


def iter_requests(path: Path, start: int) -> Generator[tuple[int, bytes], None, None]:
    """``(request_index, raw_line)`` from request ``start`` on (earlier ones are resumed)."""
    with path.open("rb") as handle:
        for index, (_number, _offset, raw) in enumerate(iter_lines(handle)):
            if index >= start:
                yield index, raw


def run_batch(options: RunOptions, engine_factory: EngineFactory | None = None) -> RunSummary:
    """Run one batch file end to end; raises ``RunFailed`` with an exit code."""
    temps: list[Path] = []
    try:
        return _run(options, engine_factory or default_engine_factory, temps)
    finally:
        for path in temps:
            path.unlink(missing_ok=True)


def _run(options: RunOptions, engine_factory: EngineFactory, temps: list[Path]) -> RunSummary:
    started = time.monotonic()
    input_path = _fetch_input(options, temps)
    total, first_url = _check_input(input_path, options.input)
    remote = io.is_url(options.output)
    if options.resume and remote:
        raise RunFailed("--resume needs a local output path, not a URL", EXIT_BAD_INPUT)
    if remote:
        out_path = _temp_file(options.output_tmp_dir, "vllm_batch_output_")
        temps.append(out_path)
    else:
        out_path = Path(options.output)
    resumed = _resume_point(out_path, input_path, total) if total and options.resume else 0
    if total and options.strict and first_url is not None:
        errors = strict_errors(input_path, first_url, [options.spec.name])
        if errors:
            raise RunFailed(describe(errors, len(errors), options.input), EXIT_BAD_INPUT)

    stats = RunStats(total=total, resumed=resumed)
    try:
        handle: BinaryIO = out_path.open("ab" if resumed else "wb")
    except OSError as exc:
        raise RunFailed(f"cannot write output {out_path}: {exc}") from exc
    with handle:
        writer = OrderedWriter(handle, start=resumed, on_result=stats.add)
        if resumed < total:
            engine = ServedModelGuard(engine_factory(options.spec, options.settings))
            progress = make_progress(
                stats, interval=options.progress_interval, tty=options.progress_tty
            )
            asyncio.run(
                _execute(engine, input_path, writer, progress, options.settings.group_prefixes)
            )
        writer.flush(sync=True)
    if writer.next_index < total:
        done = f"stopped after {writer.next_index} of {total} requests"
        if remote:
            raise RunFailed(f"{done}; nothing was uploaded")
        raise RunFailed(f"{done}; rerun with --resume to continue (output: {out_path})")
    if remote:
        try:
            io.upload(out_path, options.output)
        except io.TransferError as exc:
            temps.remove(out_path)
            raise RunFailed(f"{exc}; the output is kept at {out_path}") from exc
    return RunSummary(
        total=total,
        resumed=resumed,
        finished=stats.finished,
        errors=stats.errors,
        output_tokens=stats.output_tokens,
        seconds=time.monotonic() - started,
    )


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


def _resume_point(out_path: Path, input_path: Path, total: int) -> int:
    try:
        done = io.scan_resume(out_path, input_path)
    except io.ResumeMismatch as exc:
        raise RunFailed(f"cannot resume {out_path}: {exc}", EXIT_BAD_INPUT) from exc
    except OSError as exc:
        raise RunFailed(f"cannot resume {out_path}: {exc}") from exc
    log.info("resuming: %d of %d requests already in %s", done, total, out_path)
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
) -> None:
    """Start the engine, push every remaining line through the dispatcher, stop the engine."""
    try:
        try:
            await engine.start()
        except Exception as exc:
            raise RunFailed(f"could not start the engine: {exc}") from exc
        token = uuid.uuid4().hex[:12]
        dispatcher = Dispatcher(
            engine,
            writer.add,
            lambda index: f"vllm-batch-{token}-{index}",
            group_prefixes=group_prefixes,
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
    finally:
        await engine.stop()


def _interrupt(
    loop: asyncio.AbstractEventLoop, dispatcher: Dispatcher, sig: signal.Signals
) -> None:
    log.warning("%s: stopping; finished lines are kept, rerun with --resume", sig.name)
    loop.remove_signal_handler(sig)  # a second signal acts as usual
    dispatcher.halt()


async def _tick(writer: OrderedWriter, progress: Progress) -> None:
    while True:
        await asyncio.sleep(TICK_SECONDS)
        writer.flush()
        progress.tick()
