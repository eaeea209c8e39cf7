"""Input line checks: an empty ``custom_id`` is refused, and bytes that are not UTF-8 are
reported as such (orjson alone says "surrogates not allowed"), each with its line number."""

from __future__ import annotations

import io

import pytest

from tests.helpers import chat_line, jsonl
from vllm_batch.pipeline.input import UploadRejected, copy_upload, plan_batch

MODEL = "tiny"


def plan(body: bytes) -> list[dict[str, object]]:
    return plan_batch(
        io.BytesIO(body),
        endpoint="/v1/chat/completions",
        served_models=[MODEL],
        max_requests=100,
        chunk_size=10,
    ).errors


def test_empty_custom_id_is_refused_with_its_line() -> None:
    lines = [chat_line(0, MODEL), {**chat_line(1, MODEL), "custom_id": ""}]
    assert plan(jsonl(lines)) == [
        {
            "code": "invalid_value",
            "line": 2,
            "message": "'custom_id' must not be empty: each line needs a unique, "
            "non-empty custom_id.",
            "param": "custom_id",
        }
    ]


def test_a_one_character_custom_id_is_fine() -> None:
    assert plan(jsonl([{**chat_line(0, MODEL), "custom_id": "x"}])) == []


@pytest.mark.parametrize(
    ("bad", "byte"),
    [
        (b"\xff", "0xff"),  # never valid in UTF-8
        (b"\xc3(", "0xc3"),  # a lead byte without its continuation
        (b"\xed\xa0\x80", "0xed"),  # an encoded surrogate (orjson: "surrogates not allowed")
    ],
)
def test_invalid_utf8_upload_names_the_line_and_byte(bad: bytes, byte: str) -> None:
    line = b'{"custom_id": "' + bad + b'", "method": "POST"}\n'  # bad starts at byte 16
    body = jsonl([chat_line(0, MODEL)]) + line
    with pytest.raises(UploadRejected) as caught:
        copy_upload(io.BytesIO(body), io.BytesIO(), max_bytes=10**6, check_jsonl=True)
    assert caught.value.code == "invalid_utf8"
    assert caught.value.status == 400
    assert caught.value.message == (
        f"Invalid JSONL: line 2 is not valid UTF-8 (byte {byte} at byte 16 of the line); "
        "batch files must be UTF-8 encoded."
    )


def test_invalid_utf8_in_a_stored_file_is_a_line_error() -> None:
    """A file that reached storage another way still gets the UTF-8 message at validation."""
    body = jsonl([chat_line(0, MODEL)]) + b'{"custom_id": "\xff"}\n'
    assert plan(body) == [
        {
            "code": "invalid_json_line",
            "line": 2,
            "message": "Invalid JSONL: line 2 is not valid UTF-8 (byte 0xff at byte 16 of the "
            "line); batch files must be UTF-8 encoded.",
            "param": None,
        }
    ]


def test_a_json_escaped_lone_surrogate_is_still_a_json_error() -> None:
    """Valid UTF-8 whose JSON escape is broken keeps the JSON parser's message."""
    with pytest.raises(UploadRejected) as caught:
        copy_upload(
            io.BytesIO(b'{"custom_id": "\\ud800"}\n'),
            io.BytesIO(),
            max_bytes=10**6,
            check_jsonl=True,
        )
    assert caught.value.code == "invalid_jsonl"
    assert caught.value.message.startswith("Invalid JSONL: line 1 is not valid JSON (")
