"""In-order output of ``vllm-batch run``: reorder buffer, writer, vLLM-shaped error lines."""

from __future__ import annotations

import io
import json
import random

import pytest

from vllm_batch.engines.base import EngineResult
from vllm_batch.engines.vllm_engine import error_result
from vllm_batch.offline.writer import OrderedWriter, ReorderBuffer, vllm_error_line
from vllm_batch.store.queries import LineResult
from vllm_batch.worker.output import failure_line, result_line


def test_reorder_buffer_releases_in_index_order() -> None:
    buffer: ReorderBuffer[str] = ReorderBuffer()
    assert buffer.push(2, "c") == [] and buffer.push(1, "b") == [] and len(buffer) == 2
    assert buffer.push(0, "a") == ["a", "b", "c"] and len(buffer) == 0
    assert buffer.push(3, "d") == ["d"] and buffer.next_index == 4


def test_reorder_buffer_random_order_and_start() -> None:
    indices = list(range(10, 200))
    random.Random(1).shuffle(indices)
    buffer: ReorderBuffer[int] = ReorderBuffer(start=10)
    out = [item for index in indices for item in buffer.push(index, index)]
    assert out == list(range(10, 200)) and len(buffer) == 0


def test_reorder_buffer_rejects_duplicates() -> None:
    buffer: ReorderBuffer[str] = ReorderBuffer(start=5)
    buffer.push(7, "x")
    with pytest.raises(ValueError):
        buffer.push(7, "y")
    with pytest.raises(ValueError):
        buffer.push(4, "old")


def _ok(index: int) -> LineResult:
    body = json.dumps({"id": f"c{index}", "object": "chat.completion", "choices": []})
    data = result_line(f"id-{index}", EngineResult(200, body, output_tokens=3), f"r{index}")
    return LineResult(line=index, is_error=False, data=data, output_tokens=3)


def test_writer_writes_in_order_and_reports_every_result() -> None:
    handle = io.BytesIO()
    seen: list[int] = []
    writer = OrderedWriter(handle, start=3, on_result=lambda r: seen.append(r.line))
    for index in (4, 5, 3, 7, 6):
        writer.add(_ok(index))
    writer.flush()
    lines = handle.getvalue().decode().splitlines()
    assert [json.loads(line)["custom_id"] for line in lines] == [f"id-{i}" for i in range(3, 8)]
    assert seen == [4, 5, 3, 7, 6] and writer.written == 5 and writer.next_index == 8


def test_error_lines_take_vllm_shape() -> None:
    result = error_result(400, "BadRequestError", "Invalid request body: bad", "messages")
    line = json.loads(vllm_error_line(result_line("a", result, "req-1")))
    assert line["custom_id"] == "a"
    assert line["response"] == {"status_code": 400, "request_id": "req-1", "body": None}
    assert line["error"] == {
        "code": "invalid_request_error",
        "message": "Invalid request body: bad",
        "param": "messages",
    }


def test_other_lines_are_left_alone() -> None:
    failure = failure_line("x", "invalid_request", "broken")
    assert vllm_error_line(failure) == failure
    ok = _ok(0).data
    assert vllm_error_line(ok) == ok
