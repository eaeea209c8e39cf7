"""Request lines → engine, through a bounded in-flight window; shared by the server's
worker and ``vllm-batch run``.

Lines are read ahead in blocks (a whole chunk on the server) and, within a block, submitted
in prefix order: a trie over each request's prompt text (messages or prompt, in 128-character
pieces) puts requests that share a system prompt, a document or a few-shot block next to each
other, at every level, so vLLM's prefix cache computes the shared part once while it is
resident. Results are handed to ``on_result`` as they finish, in any order; callers order
output by line index. A caller that writes in order passes ``horizon`` (the highest line index
it can take now) so that one slow line cannot make it buffer everything behind it: lines past
the horizon wait, and reading stops, until the head line completes.

The window is a ``FairWindow`` lane: a worker holding several chunks gives every chunk's
dispatcher a lane of one shared window, so the engine stays full across chunk boundaries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Generator
from itertools import islice
from typing import Any

import anyio
import orjson

from vllm_batch.engines.engine import (
    Engine,
    EngineFailure,
    EngineOutOfMemory,
    EngineResult,
    is_cuda_oom,
    is_oom_message,
)
from vllm_batch.net.media_url import ERROR_CODE as MEDIA_ERROR_CODE
from vllm_batch.net.media_url import MediaGuard, MediaRefusal
from vllm_batch.pipeline.line_result import LineResult
from vllm_batch.pipeline.output import ErrorShape, failure_line, result_line
from vllm_batch.pipeline.window import FairWindow, Lane
from vllm_batch.retry import describe, retrying

log = logging.getLogger(__name__)
TRANSIENT_RETRIES = 3
RETRY_BACKOFF_SECONDS = 0.5
RETRY_MAX_WAIT_SECONDS = 8.0

LineSource = Generator[tuple[int, bytes], None, None]


PREFIX_PIECE = 128
PREFIX_CHARS = 8192
"""Only this much of a prompt's text takes part in the ordering."""
MAX_PIECES = PREFIX_CHARS // PREFIX_PIECE
READ_AHEAD_BYTES = 64 * 1024 * 1024
"""A read-ahead block stops at this many bytes, however many lines it was asked for."""


def prompt_pieces(line: dict[str, Any]) -> list[str]:
    """A request's prompt as ordering pieces: each message (role and content) or the prompt,
    cut into ``PREFIX_PIECE``-character pieces, at most ``PREFIX_CHARS`` in all."""
    body = line.get("body")
    if not isinstance(body, dict):
        return []
    texts: list[str] = []
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                break
            content = message.get("content")
            if isinstance(content, list):  # content parts: their text, in order
                content = "".join(
                    str(part.get("text", "")) for part in content if isinstance(part, dict)
                )
            texts.append(f"{message.get('role')}\x00{content}")
    else:
        for key in ("prompt", "input"):
            value = body.get(key)
            if isinstance(value, str):
                texts.append(value)
                break
    pieces: list[str] = []
    budget = PREFIX_CHARS
    for text in texts:
        text = text[:budget]
        budget -= len(text)
        pieces.extend(
            text[start : start + PREFIX_PIECE] for start in range(0, len(text), PREFIX_PIECE)
        )
        if budget <= 0:
            break
    return pieces[:MAX_PIECES]  # bounds the ordering's recursion


def prefix_order(prompts: list[list[str]]) -> list[int]:
    """Positions of ``prompts`` (piece lists) in prefix order: a trie walk, siblings in
    order of appearance.

    Prompts sharing a first piece come together (in the order that piece first appeared),
    then, within them, prompts sharing a second piece, and so on: shared prefixes of any
    length end up adjacent, and the first prompt always stays first. Only groups of two or
    more are looked into further, so prompts with nothing in common cost one dict lookup.
    """
    order: list[int] = []

    def walk(positions: list[int], depth: int) -> None:
        groups: dict[str, list[int]] = {}
        for position in positions:
            pieces = prompts[position]
            if len(pieces) <= depth:
                order.append(position)  # a prompt that ends here comes before longer ones
            else:
                groups.setdefault(pieces[depth], []).append(position)
        for group in groups.values():
            if len(group) == 1:
                order.append(group[0])
            else:
                walk(group, depth + 1)

    walk(list(range(len(prompts))), 0)
    return order


async def execute_line(
    engine: Engine,
    index: int,
    raw: bytes,
    request_id: str,
    *,
    shape: ErrorShape = ErrorShape.OPENAI,
    media: MediaGuard | None = None,
) -> LineResult:
    """Run one input line; every outcome except a broken engine is a ``LineResult``.

    ``media`` (if given) checks the body's media URLs first: a refused one makes the line a
    400 error line (code ``url_not_allowed``) that never reaches the engine.
    A 5xx result is retried ``TRANSIENT_RETRIES`` times (backoff with jitter) before it is
    written as the line's error; ``shape`` is the error lines' format. A CUDA out-of-memory
    error (raised, or as a 5xx result) raises ``EngineOutOfMemory``: the line is retried
    later with a smaller window, never failed for it.
    """
    line: Any = None
    try:
        line = orjson.loads(raw)
        custom_id = str(line["custom_id"])
        url = str(line["url"])
        body = line["body"]
        if not isinstance(body, dict):
            raise TypeError("'body' must be an object")
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        known_id = line.get("custom_id") if isinstance(line, dict) else None
        data = failure_line(
            str(known_id or f"line-{index + 1}"),
            "invalid_request",
            f"Unreadable request line {index + 1}: {exc}",
            shape=shape,
        )
        return LineResult(line=index, is_error=True, data=data)
    if media is not None:
        try:
            refusal = await media.check(body)
        except Exception as exc:  # a failed check refuses the line, never breaks the chunk
            log.warning("request %s: media URL check failed: %s", request_id, describe(exc))
            refusal = MediaRefusal("body", f"The media URLs could not be checked: {exc}"[:500])
        if refusal is not None:
            data = result_line(custom_id, media_refused(refusal), request_id, shape=shape)
            return LineResult(line=index, is_error=True, data=data)
    started = time.monotonic()
    try:
        result = await _run_retrying_5xx(engine, url, body, request_id)
    except (EngineFailure, asyncio.CancelledError):
        raise
    except Exception as exc:  # one bad request must never take its chunk down with it
        if is_cuda_oom(exc):
            raise EngineOutOfMemory(describe(exc)[:500]) from exc
        log.warning("request %s failed: %s", request_id, describe(exc), exc_info=True)
        data = failure_line(
            custom_id,
            "request_failed",
            f"The request could not be processed: {describe(exc)[:500]}",
            shape=shape,
        )
        return LineResult(line=index, is_error=True, data=data, seconds=time.monotonic() - started)
    return LineResult(
        line=index,
        is_error=not result.ok,
        data=result_line(custom_id, result, request_id, shape=shape),
        input_tokens=result.input_tokens,
        cached_tokens=result.cached_tokens,
        output_tokens=result.output_tokens,
        reasoning_tokens=result.reasoning_tokens,
        seconds=time.monotonic() - started,
    )


def media_refused(refusal: MediaRefusal) -> EngineResult:
    """A refused media URL as the 400 answer an OpenAI-style server gives."""
    error = {
        "message": refusal.message,
        "type": "invalid_request_error",
        "param": refusal.param,
        "code": MEDIA_ERROR_CODE,
    }
    return EngineResult(
        status_code=400,
        body_json=orjson.dumps({"error": error}).decode(),
        error_code=MEDIA_ERROR_CODE,
        error_message=refusal.message,
    )


class _Transient(Exception):
    """A 5xx result, raised only to drive the retrier."""

    def __init__(self, result: EngineResult) -> None:
        super().__init__(result.status_code)
        self.result = result

    def __str__(self) -> str:
        return f"HTTP {self.result.status_code}: {self.result.error_message}"


async def _run_retrying_5xx(
    engine: Engine, url: str, body: dict[str, Any], request_id: str
) -> EngineResult:
    """``engine.run``, retried on 5xx results; the last result if they all fail.

    The first attempt runs without building a retrier (almost every line needs only it);
    a 5xx result then enters the retry policy as its attempt 1.
    """
    first = _checked(await engine.run(url, body, request_id))
    if first.status_code < 500:
        return first
    policy = retrying(
        on=_Transient,
        attempts=TRANSIENT_RETRIES + 1,
        max_wait=RETRY_MAX_WAIT_SECONDS,
        first_wait=RETRY_BACKOFF_SECONDS,
        log=log,
        what=f"request {request_id}",
    )
    try:
        async for attempt in policy:
            with attempt:
                number = attempt.retry_state.attempt_number
                result = (
                    first
                    if number == 1
                    else _checked(await engine.run(url, body, f"{request_id}-retry{number - 1}"))
                )
                if result.status_code >= 500:
                    raise _Transient(result)
                return result
    except _Transient as exc:
        return exc.result
    raise AssertionError("unreachable: the retrier returns or raises")


def _checked(result: EngineResult) -> EngineResult:
    """``result``, unless it is a CUDA out-of-memory error (raised as ``EngineOutOfMemory``)."""
    if result.status_code >= 500 and is_oom_message(result.error_message):
        raise EngineOutOfMemory(result.error_message or "CUDA out of memory")
    return result


class Dispatcher:
    """Keeps ``max_in_flight`` requests (default: the engine's wish) submitted until the
    source is drained, or takes its slots from a shared ``window`` through ``lane``.

    ``horizon``, if given, returns the highest line index the caller can take now; a line
    beyond it is held back (and no further block is read) until a result moves the horizon.
    Do not combine it with ``skip``: a skipped line would never complete. ``read_ahead`` is
    the block size (lines) within which lines are put in prefix order. ``on_first_submit``
    is called once, just before the first line goes to the engine. ``media`` checks every
    line's media URLs before the engine sees it (default: no private target allowed).
    """

    def __init__(
        self,
        engine: Engine,
        on_result: Callable[[LineResult], None],
        request_id: Callable[[int], str],
        *,
        group_prefixes: bool = True,
        horizon: Callable[[], int] | None = None,
        error_shape: ErrorShape = ErrorShape.OPENAI,
        max_in_flight: int | None = None,
        window: FairWindow | None = None,
        lane: Lane | None = None,
        read_ahead: int | None = None,
        on_first_submit: Callable[[], None] | None = None,
        media: MediaGuard | None = None,
    ) -> None:
        if (window is None) != (lane is None):
            raise ValueError("pass a shared window together with this dispatcher's lane")
        self.engine = engine
        self.max_in_flight = max_in_flight
        self.on_result = on_result
        self.request_id = request_id
        self.group_prefixes = group_prefixes
        self.horizon = horizon
        self.error_shape = error_shape
        self.read_ahead = read_ahead
        self.media = media if media is not None else MediaGuard()
        self.on_first_submit = on_first_submit
        self.stopped = asyncio.Event()
        self.failure: EngineFailure | None = None
        self._window = window
        self._lane = lane
        self._tasks: set[asyncio.Task[None]] = set()
        self._progress = asyncio.Event()

    async def run(self, source: LineSource, skip: Collection[int] = ()) -> None:
        """Submit every line of ``source`` not in ``skip``; raise ``EngineFailure`` if it broke."""
        if self._window is None or self._lane is None:
            self._window = FairWindow(self.max_in_flight or self.engine.max_in_flight)
            self._lane = self._window.open_lane()
        window, lane = self._window, self._lane
        block_size = self.read_ahead or max(256, 2 * window.size)
        try:
            while not self.stopped.is_set():
                block = await anyio.to_thread.run_sync(self._read_block, source, block_size)
                if not block:
                    break
                # Ordering parses every line of the block: off the event loop.
                pending = await anyio.to_thread.run_sync(self._pending, block, skip)
                while pending:
                    if not await window.acquire(lane):
                        break
                    item = await self._take(pending)
                    if item is None:
                        window.release(lane)
                        break
                    if self.on_first_submit is not None:
                        first, self.on_first_submit = self.on_first_submit, None
                        first()
                    task = asyncio.create_task(self._one(*item))
                    self._tasks.add(task)
                    # Released however the task ends, even if cancelled before it started.
                    task.add_done_callback(self._done)
            if self._tasks:
                await asyncio.wait(set(self._tasks))
        finally:
            self.halt()
            if self._tasks:
                await asyncio.wait(set(self._tasks))
        if self.failure is not None:
            raise self.failure

    async def _take(self, pending: list[tuple[int, bytes]]) -> tuple[int, bytes] | None:
        """The next line to submit (the first one within the horizon), or None once stopped.

        ``pending`` is in reverse order: the next line is at its end.
        """
        while not self.stopped.is_set():
            if self.horizon is None:
                return pending.pop()
            limit = self.horizon()
            for position in range(len(pending) - 1, -1, -1):
                if pending[position][0] <= limit:
                    return pending.pop(position)
            self._progress.clear()
            await self._progress.wait()
        return None

    @staticmethod
    def _read_block(source: LineSource, size: int) -> list[tuple[int, bytes]]:
        block: list[tuple[int, bytes]] = []
        budget = READ_AHEAD_BYTES
        for item in islice(source, size):
            block.append(item)
            budget -= len(item[1])
            if budget <= 0:
                break
        return block

    def _pending(
        self, block: list[tuple[int, bytes]], skip: Collection[int]
    ) -> list[tuple[int, bytes]]:
        """The block's lines to submit, in reverse submission order (``pop()`` is O(1))."""
        pending = self._order([(i, r) for i, r in block if i not in skip])
        pending.reverse()
        return pending

    def _order(self, block: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        if not self.group_prefixes or len(block) < 2:
            return block
        prompts = []
        for _index, raw in block:
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                line = None
            prompts.append(prompt_pieces(line) if isinstance(line, dict) else [])
        return [block[position] for position in prefix_order(prompts)]

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        assert self._window is not None and self._lane is not None
        self._window.release(self._lane)
        self._progress.set()

    async def _one(self, index: int, raw: bytes) -> None:
        try:
            result = await execute_line(
                self.engine,
                index,
                raw,
                self.request_id(index),
                shape=self.error_shape,
                media=self.media,
            )
        except EngineFailure as exc:
            self.failure = exc
            self.halt()
            return
        self.on_result(result)

    def halt(self) -> None:
        """Stop submitting and abort what is in flight (vLLM aborts cancelled requests)."""
        self.stopped.set()
        self._progress.set()
        if self._window is not None and self._lane is not None and not self._lane.closed:
            self._window.close_lane(self._lane)
        for task in list(self._tasks):
            task.cancel()
