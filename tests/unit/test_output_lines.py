"""Output/error line shapes: OpenAI's (the server) and ``vllm run-batch``'s (``run``)."""

from __future__ import annotations

import json

from vllm_batch.config import ModelSpec, Settings
from vllm_batch.engines.engine import EngineResult
from vllm_batch.engines.vllm_engine import engine_argv, error_result
from vllm_batch.pipeline.output import ErrorShape, failure_line, result_line


def test_success_line_embeds_body_verbatim() -> None:
    body = '{"id":"chatcmpl-1","object":"chat.completion","choices":[]}'
    line = json.loads(result_line('we"ird', EngineResult(200, body), "req-1"))
    assert line["id"].startswith("batch_req_") and line["custom_id"] == 'we"ird'
    assert line["response"] == {"status_code": 200, "request_id": "req-1", "body": json.loads(body)}
    assert line["error"] is None


def test_error_line_has_status_body_and_error() -> None:
    result = error_result(400, "BadRequestError", "prompt too long", "messages")
    line = json.loads(result_line("a", result, "req-2"))
    assert line["response"]["status_code"] == 400
    assert line["response"]["body"]["error"]["message"] == "prompt too long"
    assert line["error"] == {"code": "invalid_request_error", "message": "prompt too long"}


def test_failure_line_has_null_response() -> None:
    line = json.loads(failure_line("x", "batch_expired", "too late"))
    assert line["response"] is None and line["error"]["code"] == "batch_expired"


def test_vllm_shape_error_line_matches_vllm_run_batch() -> None:
    """vLLM's ``BatchRequestOutput`` for an ``ErrorResponse``: null body, the error wrapped."""
    result = error_result(404, "NotFoundError", "The model `x` does not exist.", "model")
    line = json.loads(result_line("a", result, "req-1", shape=ErrorShape.VLLM))
    assert list(line) == ["id", "custom_id", "response", "error"]
    assert line["custom_id"] == "a"
    assert line["response"] == {"status_code": 404, "request_id": "req-1", "body": None}
    assert line["error"] == {
        "error": {
            "message": "The model `x` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }


def test_vllm_shape_error_line_without_an_error_body() -> None:
    result = EngineResult(503, "{}", error_code="server_error", error_message="overloaded")
    line = json.loads(result_line("a", result, "req-1", shape=ErrorShape.VLLM))
    assert line["error"]["error"] == {
        "message": "overloaded",
        "type": "server_error",
        "param": None,
        "code": 503,
    }


def test_success_lines_are_the_same_in_both_shapes() -> None:
    body = '{"id":"chatcmpl-1","choices":[]}'
    openai = json.loads(result_line("a", EngineResult(200, body), "r", shape=ErrorShape.OPENAI))
    vllm = json.loads(result_line("a", EngineResult(200, body), "r", shape=ErrorShape.VLLM))
    assert {**openai, "id": None} == {**vllm, "id": None}


def test_vllm_shape_failure_line_is_vllms_request_error() -> None:
    """Like vLLM's ``make_error_request_output``: a 400 response and the message as a string."""
    line = json.loads(failure_line("x", "invalid_request", "broken", shape=ErrorShape.VLLM))
    assert line["response"]["status_code"] == 400 and line["response"]["body"] is None
    assert line["response"]["request_id"].startswith("vllm-batch-")
    assert line["error"] == "broken"


def test_engine_argv_maps_settings() -> None:
    settings = Settings(
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        max_num_seqs=8,
        enable_prefix_caching=False,
    )
    argv = engine_argv(ModelSpec("tiny", "/models/tiny"), settings)
    joined = " ".join(argv)
    assert "--model /models/tiny --served-model-name tiny" in joined
    assert "--enforce-eager" in argv and "--no-enable-prefix-caching" in argv
    assert "--max-model-len 512" in joined and "--max-num-seqs 8" in joined
    assert "--dtype float32" in joined
