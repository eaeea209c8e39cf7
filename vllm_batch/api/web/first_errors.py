"""A batch's first errors, from wherever they are right now.

Validation errors live on the batch; failed lines sit in ``results`` while the batch
runs, and in its error file once finished (results are dropped after finalizing). Error
file heads are cached per file id: finished files never change.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import anyio
import orjson

from vllm_batch.protocol.dashboard import LineError
from vllm_batch.storage.blob import BlobStorage

MAX_MESSAGE_CHARS = 300
HEAD_BYTES = 64 * 1024
CACHED_FILES = 512
MAX_CACHED_LINES = 10


def parse_error_line(data: str | bytes, line: int | None = None) -> LineError:
    """An error-file line (either error shape) as a ``LineError``; never raises."""
    try:
        parsed: Any = orjson.loads(data)
    except orjson.JSONDecodeError:
        return LineError(line=line, message=_clip(str(data)))
    if not isinstance(parsed, dict):
        return LineError(line=line, message=_clip(str(parsed)))
    custom_id = parsed.get("custom_id")
    error = parsed.get("error")
    if isinstance(error, dict) and isinstance(error.get("error"), dict):  # vLLM's shape
        error = error["error"]
    code: Any = None
    message: Any = error
    if isinstance(error, dict):
        code, message = error.get("code"), error.get("message")
    if message is None:
        response = parsed.get("response") or {}
        message = f"status {response.get('status_code')}" if isinstance(response, dict) else ""
    return LineError(
        line=line,
        custom_id=custom_id if isinstance(custom_id, str) else None,
        code=None if code is None else str(code),
        message=_clip(str(message)),
    )


def validation_errors(errors: list[dict[str, Any]] | None, limit: int) -> list[LineError]:
    """The batch's own ``errors.data`` (input validation), first ``limit``."""
    out = []
    for error in (errors or [])[:limit]:
        line = error.get("line")
        out.append(
            LineError(
                line=line if isinstance(line, int) else None,
                code=error.get("code"),
                message=_clip(str(error.get("message", ""))),
            )
        )
    return out


def _clip(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


class ErrorFileHeads:
    """The first error lines of finished error files, read once and kept (LRU)."""

    def __init__(self, storage: BlobStorage, size: int = CACHED_FILES) -> None:
        self.storage = storage
        self.size = size
        self._cache: OrderedDict[str, list[LineError]] = OrderedDict()

    async def get(self, file_id: str, storage_key: str, limit: int) -> list[LineError]:
        cached = self._cache.get(file_id)
        if cached is None:
            try:
                head = await anyio.to_thread.run_sync(self._read_head, storage_key)
            except Exception:  # a missing or unreadable file shows no errors, not a 500
                return []
            cached = [parse_error_line(line) for line in head[:MAX_CACHED_LINES]]
            self._cache[file_id] = cached
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(file_id)
        return cached[:limit]

    def _read_head(self, key: str) -> list[bytes]:
        """The complete, non-empty lines among the file's first ``HEAD_BYTES``."""
        with self.storage.open_read(key) as handle:
            data = handle.read(HEAD_BYTES + 1)
        lines = data[:HEAD_BYTES].split(b"\n")
        if len(data) > HEAD_BYTES:
            lines.pop()  # cut off mid-line
        return [line for line in lines if line.strip()]
