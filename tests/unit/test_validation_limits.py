"""Nesting depth limits and per-line robustness of batch validation."""

from __future__ import annotations

import io
import json

import pytest

from vllm_batch.pipeline.input import (
    MAX_JSON_DEPTH,
    UploadRejected,
    copy_upload,
    plan_batch,
    too_deep,
)


def nested_line(custom_id: str, depth: int) -> bytes:
    head = json.dumps(
        {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": {}}
    )[:-3].encode()
    return head + b'{"model": "m", "x": ' + b"[" * depth + b"]" * depth + b"}}\n"


def plan(data: bytes, served: object = ("m",)):  # type: ignore[no-untyped-def]
    return plan_batch(
        io.BytesIO(data),
        endpoint="/v1/chat/completions",
        served_models=served,  # type: ignore[arg-type]
        max_requests=100,
        chunk_size=10,
    )


def test_too_deep_counts_levels_without_recursion() -> None:
    value: list[object] = []
    for _ in range(100_000):
        value = [value]
    assert too_deep(value, 64)
    five_levels = {"a": [{"b": [1, 2, {"c": None}]}]}
    assert not too_deep(five_levels, 5) and too_deep(five_levels, 4)
    assert too_deep({"a": [{"b": [1, 2, {"c": []}]}]}, 5)


def test_upload_rejects_deep_lines_with_their_number() -> None:
    ok = nested_line("a", MAX_JSON_DEPTH - 3)  # the line object and body add levels
    for depth in (MAX_JSON_DEPTH, 1000, 5000):
        with pytest.raises(UploadRejected) as exc:
            copy_upload(
                io.BytesIO(ok + nested_line("b", depth)),
                io.BytesIO(),
                max_bytes=1 << 20,
                check_jsonl=True,
            )
        assert "line 2" in exc.value.message and exc.value.status == 400
    assert copy_upload(io.BytesIO(ok), io.BytesIO(), max_bytes=1 << 20, check_jsonl=True).requests


def test_plan_reports_deep_lines_as_line_errors() -> None:
    result = plan(nested_line("a", 3) + nested_line("b", 1000) + nested_line("c", 3000))
    assert [(e["line"], e["code"]) for e in result.errors] == [
        (2, "invalid_json_line"),
        (3, "invalid_json_line"),
    ]
    assert result.total == 3


class ExplodingModels(tuple[str, ...]):
    """A fake served-model list that fails on one name: stands in for any unexpected bug."""

    def __contains__(self, item: object) -> bool:
        if item == "boom":
            raise RuntimeError("unexpected")
        return super().__contains__(item)


def test_an_exception_while_checking_a_line_becomes_its_error() -> None:
    lines = nested_line("a", 1) + nested_line("b", 1).replace(b'"m"', b'"boom"')
    result = plan(lines, ExplodingModels(("m",)))
    assert [(e["line"], e["code"]) for e in result.errors] == [(2, "invalid_line")]
    assert result.total == 2 and result.model == "m"
