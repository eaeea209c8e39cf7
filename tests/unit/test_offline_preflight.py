"""Pre-flight checks of ``vllm-batch run``: structure always, the server's rules with --strict."""

from __future__ import annotations

import io
import json
from pathlib import Path

from vllm_batch.offline.preflight import Preflight, describe, line_problem, preflight, strict_errors


def request(custom_id: str, model: str = "tiny", url: str = "/v1/chat/completions") -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def scan(text: str) -> Preflight:
    return preflight(io.BytesIO(text.encode()))


def test_counts_requests_and_skips_blank_lines() -> None:
    check = scan(f"{request('a')}\n\n   \n{request('b', url='/v1/completions')}\n")
    assert check.ok and check.total == 2 and check.first_url == "/v1/chat/completions"


def test_empty_input_is_fine() -> None:
    check = scan("\n\n")
    assert check.ok and check.total == 0 and check.first_url is None


def test_names_the_physical_line_of_each_problem() -> None:
    lines = [
        request("a"),
        "",
        "{not json",
        "[1, 2]",
        json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}),
        json.dumps({"custom_id": 7, "method": "POST", "url": "/x", "body": {}}),
        json.dumps({"custom_id": "x", "method": "POST", "url": "/x", "body": "text"}),
        request("ok"),
    ]
    check = scan("\n".join(lines) + "\n")
    assert not check.ok and check.total == 7 and check.bad_lines == 5
    assert check.errors[0].startswith("line 3: not valid JSON")
    assert check.errors[1] == "line 4: expected a JSON object, got list"
    assert check.errors[2] == "line 5: missing required field(s) 'custom_id'"
    assert check.errors[3] == "line 6: 'custom_id' must be a string"
    assert check.errors[4] == "line 7: 'body' must be a JSON object"


def test_error_list_is_bounded_but_counted() -> None:
    check = scan("nope\n" * 500)
    assert check.bad_lines == 500 and len(check.errors) == 20
    message = describe(check.errors, check.bad_lines, "in.jsonl")
    assert message.startswith("in.jsonl: 500 invalid line(s):") and "... and 480 more" in message


def test_line_problem_accepts_a_valid_line() -> None:
    assert line_problem(request("a").encode(), 1) is None


def test_strict_reports_model_endpoint_and_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(
        "\n".join(
            [
                request("a"),
                request("b", model="other"),
                request("a"),
                request("c", url="/v1/completions"),
            ]
        )
        + "\n"
    )
    errors = strict_errors(path, "/v1/chat/completions", ["tiny"])
    assert [error.split(":")[0] for error in errors] == ["line 2", "line 3", "line 4"]
    assert "not served here" in errors[0] and "more than one line" in errors[1]
    assert strict_errors(path, "/v1/chat/completions", ["tiny", "other"])[0].startswith("line 2")


def test_strict_passes_a_clean_file(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(f"{request('a')}\n{request('b')}\n")
    assert strict_errors(path, "/v1/chat/completions", ["tiny"]) == []
