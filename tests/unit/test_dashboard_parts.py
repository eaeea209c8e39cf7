"""Dashboard pieces without a server: ``Accept`` negotiation for ``/``, error-line parsing
in both error shapes, and error-file heads read from real local storage."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from vllm_batch.api.web.first_errors import HEAD_BYTES, ErrorFileHeads, parse_error_line
from vllm_batch.api.web.pages import prefers_html
from vllm_batch.engines.engine import EngineResult
from vllm_batch.pipeline.output import ErrorShape, failure_line, result_line
from vllm_batch.storage.local import LocalStorage


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        ("", False),
        ("*/*", False),
        ("application/json", False),
        ("text/html, application/json", False),
        ("application/json;q=0.9, text/html", True),
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", True),  # Chrome
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8,image/webp", True),
        ("TEXT/HTML; Q=1", True),
        ("text/html;q=0", False),
        ("text/html;q=bogus", False),
        ("text/*;q=0.5, */*;q=0.1", True),
        ("text/plain, */*", False),
    ],
)
def test_prefers_html(accept: str, html: bool) -> None:
    assert prefers_html(accept) is html


def engine_error(code: int, message: str) -> EngineResult:
    return EngineResult(
        status_code=code,
        body_json="null",
        error_code="invalid_request_error",
        error_message=message,
    )


def test_parse_both_error_shapes() -> None:
    openai_line = result_line("req-1", engine_error(400, "too long"), "rid")
    parsed = parse_error_line(openai_line, 7)
    assert (parsed.line, parsed.custom_id, parsed.code, parsed.message) == (
        7,
        "req-1",
        "invalid_request_error",
        "too long",
    )
    vllm_line = result_line("req-2", engine_error(400, "bad temp"), "rid", shape=ErrorShape.VLLM)
    assert parse_error_line(vllm_line).message == "bad temp"
    failure = failure_line("req-3", "model_not_found", "no such model", shape=ErrorShape.VLLM)
    assert parse_error_line(failure).message == "no such model"
    assert parse_error_line("not json").message == "not json"
    assert parse_error_line("[1]").message == "[1]"
    assert len(parse_error_line(failure_line("x", "c", "m" * 5000)).message) == 300


def test_error_file_heads(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    lines = [failure_line(f"req-{i}", "c", "x" * 1000) for i in range(200)]  # > HEAD_BYTES
    assert sum(len(line) + 1 for line in lines) > HEAD_BYTES
    with storage.open_write("files/err") as handle:
        handle.write(("\n".join(lines)).encode())  # no trailing newline
    with storage.open_write("files/short") as handle:
        handle.write((lines[0] + "\n" + lines[1]).encode())
    heads = ErrorFileHeads(storage, size=1)

    async def read() -> None:
        first = await heads.get("file-err", "files/err", 3)
        assert [e.custom_id for e in first] == ["req-0", "req-1", "req-2"]
        assert len(await heads.get("file-err", "files/err", 50)) == 10  # cached head: 10 lines
        short = await heads.get("file-short", "files/short", 5)
        assert [e.custom_id for e in short] == ["req-0", "req-1"]  # last line unterminated
        assert list(heads._cache) == ["file-short"]  # LRU of size 1
        assert await heads.get("file-gone", "files/gone", 3) == []

    asyncio.run(read())
