"""Streaming JSONL checks: upload scanning and batch planning, with line numbers."""

from __future__ import annotations

import io
import json

import pytest

from vllm_batch.pipeline.input import UploadRejected, copy_upload, iter_lines, plan_batch


def line(custom_id: str, model: str = "m", url: str = "/v1/chat/completions") -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return (
        json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).encode()
        + b"\n"
    )


def plan(data: bytes, **kwargs: object):  # type: ignore[no-untyped-def]
    options: dict[str, object] = {
        "endpoint": "/v1/chat/completions",
        "served_models": ["m"],
        "max_requests": 100,
        "chunk_size": 3,
    }
    options.update(kwargs)
    return plan_batch(io.BytesIO(data), **options)  # type: ignore[arg-type]


def test_copy_upload_counts_requests_and_skips_blank_lines() -> None:
    data = line("a") + b"\n" + line("b")
    out = io.BytesIO()
    scan = copy_upload(io.BytesIO(data), out, max_bytes=10_000, check_jsonl=True)
    assert scan.requests == 2 and scan.bytes == len(data) and out.getvalue() == data


def test_copy_upload_names_the_bad_line() -> None:
    with pytest.raises(UploadRejected) as exc:
        copy_upload(
            io.BytesIO(line("a") + b"\n" + b"{bad\n"),
            io.BytesIO(),
            max_bytes=10_000,
            check_jsonl=True,
        )
    assert "line 3" in exc.value.message and exc.value.status == 400


def test_copy_upload_size_limit_is_413() -> None:
    with pytest.raises(UploadRejected) as exc:
        copy_upload(io.BytesIO(line("a") * 10), io.BytesIO(), max_bytes=200, check_jsonl=True)
    assert exc.value.status == 413


def test_copy_upload_other_purposes_are_not_parsed() -> None:
    scan = copy_upload(io.BytesIO(b"plain text"), io.BytesIO(), max_bytes=100, check_jsonl=False)
    assert scan.bytes == 10


def test_iter_lines_offsets_point_at_line_starts() -> None:
    data = line("a") + b"\n\n" + line("b")
    for _number, offset, raw in iter_lines(io.BytesIO(data)):
        assert data[offset : offset + len(raw)] == raw


def test_plan_cuts_chunks_with_byte_offsets() -> None:
    lines = [line(f"id{i}") for i in range(7)]
    data = b"".join(lines[:4]) + b"\n" + b"".join(lines[4:])
    result = plan(data)
    assert not result.errors and result.model == "m" and result.total == 7
    assert [(s, e) for s, e, _ in result.chunks] == [(0, 3), (3, 6), (6, 7)]
    for start, _end, offset in result.chunks:
        assert data[offset:].startswith(lines[start])


def test_plan_reports_every_problem_with_line_numbers() -> None:
    data = (
        line("a")
        + line("a")
        + b"[1]\n"
        + line("c", model="other")
        + line("d", url="/v1/completions")
        + line("e", model="x")
    )
    result = plan(data, served_models=["m", "other"])
    assert [(e["code"], e["line"]) for e in result.errors] == [
        ("duplicate_custom_id", 2),
        ("invalid_json_line", 3),
        ("mismatched_model", 4),
        ("mismatched_endpoint", 5),
        ("model_not_found", 6),
    ]


def test_plan_limits_and_empty() -> None:
    assert plan(b"\n\n").errors[0]["code"] == "empty_file"
    too_many = plan(b"".join(line(f"i{i}") for i in range(5)), max_requests=4)
    assert too_many.errors[-1]["code"] == "too_many_requests" and too_many.total == 5


def test_plan_type_errors() -> None:
    bad = json.dumps(
        {"custom_id": 5, "method": "POST", "url": "/v1/chat/completions", "body": "nope"}
    ).encode()
    codes = [(e["code"], e["param"]) for e in plan(bad).errors]
    assert codes == [("invalid_type", "custom_id"), ("invalid_type", "body")]
