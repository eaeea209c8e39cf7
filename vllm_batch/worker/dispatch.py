"""Request lines → engine, through a bounded in-flight window; shared by the server's
worker and ``vllm-batch run``.

Lines are read ahead in blocks and, within a block, submitted grouped by prompt prefix
(system prompt / first message), so requests that share a prefix reach vLLM together and
hit its prefix cache. Results are handed to ``on_result`` as they finish, in any order;
callers order output by line index.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Generator
from itertools import islice
from typing import Any

import anyio
import orjson

from vllm_batch.engines.base import Engine, EngineFailure
from vllm_batch.store.queries import LineResult
from vllm_batch.worker.output import failure_line, result_line

log = logging.getLogger(__name__)
TRANSIENT_RETRIES = 3
RETRY_BACKOFF_SECONDS = 0.5

LineSource = Generator[tuple[int, bytes], None, None]


def prefix_key(line: dict[str, Any]) -> str:
    """What requests must share to reuse vLLM's prefix cache: the first message / prompt."""
    body = line.get("body")
    if not isinstance(body, dict):
        return ""
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        return str(messages[0].get("content"))[:512]
    prompt = body.get("prompt")
    return prompt[:512] if isinstance(prompt, str) else ""


async def execute_line(engine: Engine, index: int, raw: bytes, request_id: str) -> LineResult:
    """Run one input line; every outcome except a broken engine is a ``LineResult``."""
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
        )
        return LineResult(line=index, is_error=True, data=data)
    for attempt in range(TRANSIENT_RETRIES + 1):
        result = await engine.run(
            url, body, request_id if not attempt else f"{request_id}-retry{attempt}"
        )
        if result.status_code < 500 or attempt == TRANSIENT_RETRIES:
            break
        log.warning(
            "request %s failed transiently (%s); retrying", request_id, result.error_message
        )
        await asyncio.sleep(RETRY_BACKOFF_SECONDS * 2**attempt)
    return LineResult(
        line=index,
        is_error=not result.ok,
        data=result_line(custom_id, result, request_id),
        input_tokens=result.input_tokens,
        cached_tokens=result.cached_tokens,
        output_tokens=result.output_tokens,
        reasoning_tokens=result.reasoning_tokens,
    )


class Dispatcher:
    """Keeps ``engine.max_in_flight`` requests submitted until the source is drained."""

    def __init__(
        self,
        engine: Engine,
        on_result: Callable[[LineResult], None],
        request_id: Callable[[int], str],
        *,
        group_prefixes: bool = True,
    ) -> None:
        self.engine = engine
        self.on_result = on_result
        self.request_id = request_id
        self.group_prefixes = group_prefixes
        self.stopped = asyncio.Event()
        self.failure: EngineFailure | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, source: LineSource, skip: Collection[int] = ()) -> None:
        """Submit every line of ``source`` not in ``skip``; raise ``EngineFailure`` if it broke."""
        window = asyncio.Semaphore(self.engine.max_in_flight)
        block_size = max(256, 2 * self.engine.max_in_flight)
        try:
            while not self.stopped.is_set():
                block = await anyio.to_thread.run_sync(self._read_block, source, block_size)
                if not block:
                    break
                for index, raw in self._order([(i, r) for i, r in block if i not in skip]):
                    await window.acquire()
                    if self.stopped.is_set():
                        window.release()
                        break
                    task = asyncio.create_task(self._one(index, raw, window))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            if self._tasks:
                await asyncio.wait(set(self._tasks))
        finally:
            self.halt()
            if self._tasks:
                await asyncio.wait(set(self._tasks))
        if self.failure is not None:
            raise self.failure

    @staticmethod
    def _read_block(source: LineSource, size: int) -> list[tuple[int, bytes]]:
        return list(islice(source, size))

    def _order(self, block: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        if not self.group_prefixes or len(block) < 2:
            return block
        keys: dict[str, int] = {}
        ranked = []
        for index, raw in block:
            try:
                key = prefix_key(orjson.loads(raw))
            except orjson.JSONDecodeError:
                key = ""
            ranked.append((keys.setdefault(key, len(keys)), index, raw))
        ranked.sort(key=lambda item: (item[0], item[1]))
        return [(index, raw) for _, index, raw in ranked]

    async def _one(self, index: int, raw: bytes, window: asyncio.Semaphore) -> None:
        try:
            result = await execute_line(self.engine, index, raw, self.request_id(index))
        except EngineFailure as exc:
            self.failure = exc
            self.halt()
            return
        finally:
            window.release()
        self.on_result(result)

    def halt(self) -> None:
        """Stop submitting and abort what is in flight (vLLM aborts cancelled requests)."""
        self.stopped.set()
        for task in list(self._tasks):
            task.cancel()
