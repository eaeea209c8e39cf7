"""In-order output of ``vllm-batch run``: reorder buffer and writer."""

from __future__ import annotations

import io
import json
import random

import pytest

from vllm_batch.engines.engine import EngineResult
from vllm_batch.offline.writer import OrderedWriter, ReorderBuffer
from vllm_batch.pipeline.line_result import LineResult
from vllm_batch.pipeline.output import result_line


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


def test_writer_horizon_follows_the_head() -> None:
    writer = OrderedWriter(io.BytesIO(), start=10, max_buffered=3)
    assert writer.horizon() == 13
    writer.add(_ok(12))
    writer.add(_ok(11))
    assert writer.horizon() == 13 and writer.peak_buffered == 2
    writer.add(_ok(10))
    assert writer.horizon() == 16 and len(writer.buffer) == 0


def test_writer_rejects_a_zero_bound() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        OrderedWriter(io.BytesIO(), max_buffered=0)
