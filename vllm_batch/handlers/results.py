"""A batch's result lines as handlers see them: parsed, streamed, re-iterable, sized."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vllm_batch.storage.blob import BlobStorage


@dataclass(frozen=True)
class BatchInfo:
    """What a handler may want to know about the batch besides its lines."""

    id: str
    status: str
    endpoint: str
    model: str | None
    metadata: dict[str, Any]
    output_file_id: str | None
    error_file_id: str | None
    output_key: str | None = field(default=None, repr=False)
    error_key: str | None = field(default=None, repr=False)
    request_counts: dict[str, int] = field(default_factory=dict)


class ResultStream:
    """Iterates the output file's lines, then the error file's, parsed, from storage.

    Never holds more than one line in memory. Each ``iter()`` reads the files again, so a
    handler may loop twice; ``len()`` counts the lines (one streaming pass, cached).
    """

    def __init__(self, storage: BlobStorage, batch: BatchInfo) -> None:
        self.storage = storage
        self.batch = batch
        self._len: int | None = None

    @property
    def keys(self) -> list[str]:
        return [key for key in (self.batch.output_key, self.batch.error_key) if key]

    def raw_lines(self) -> Iterator[bytes]:
        """The lines exactly as stored (each ends with a newline)."""
        for key in self.keys:
            with self.storage.open_read(key) as stream:
                for line in stream:
                    if line.strip():
                        yield line if line.endswith(b"\n") else line + b"\n"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for line in self.raw_lines():
            value = json.loads(line)
            if isinstance(value, dict):
                yield value

    def __len__(self) -> int:
        if self._len is None:
            self._len = sum(1 for _ in self.raw_lines())
        return self._len

    def successes(self) -> Iterator[dict[str, Any]]:
        """Lines with a 200 response and no error."""
        for result in self:
            response = result.get("response") or {}
            if not result.get("error") and response.get("status_code") == 200:
                yield result

    def __repr__(self) -> str:
        return f"ResultStream(batch={self.batch.id!r})"


def answer_text(result: dict[str, Any]) -> str | None:
    """The generated text of a chat or completion result line, if it has one."""
    body = (result.get("response") or {}).get("body") or {}
    choices = body.get("choices") or []
    if not choices:
        return None
    choice = choices[0]
    message = choice.get("message")
    if isinstance(message, dict):
        content = message.get("content")
        return content if isinstance(content, str) else None
    text = choice.get("text")
    return text if isinstance(text, str) else None
