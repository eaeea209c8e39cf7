"""Output and error file lines, in one of two error shapes.

Success lines are the same in both shapes. Error lines differ:

``ErrorShape.OPENAI`` (the server; OpenAI's batch output)::

    {"id", "custom_id", "response": {"status_code": 404, "request_id", "body": {"error": {...}}},
     "error": {"code": "not_found_error", "message": "..."}}
    failure (never reached the engine): "response": null, "error": {"code", "message"}

``ErrorShape.VLLM`` (``vllm-batch run``; what ``vllm run-batch`` writes, see vLLM's
``entrypoints/launchers/run_batch.py``, ``BatchRequestOutput``)::

    {"id", "custom_id", "response": {"status_code": 404, "request_id", "body": null},
     "error": {"error": {"message", "type", "param", "code": 404}}}   # vLLM's ErrorResponse
    failure: "response": {"status_code": 400, "request_id", "body": null}, "error": "message"
"""

from __future__ import annotations

import contextlib
from enum import StrEnum
from typing import Any

import orjson

from vllm_batch.engines.engine import EngineResult
from vllm_batch.protocol.ids import new_id, new_line_id


class ErrorShape(StrEnum):
    """Which batch output format error lines follow (success lines are identical)."""

    OPENAI = "openai"
    VLLM = "vllm"


def result_line(
    custom_id: str,
    result: EngineResult,
    request_id: str,
    *,
    shape: ErrorShape = ErrorShape.OPENAI,
) -> str:
    """One output (200) or error (non-200) line, without the trailing newline.

    A success body is embedded as already-serialised JSON, never parsed again.
    """
    body = result.body_json
    error = "null"
    if not result.ok:
        if shape is ErrorShape.VLLM:
            body = "null"
            error = orjson.dumps({"error": _vllm_error_info(result)}).decode()
        else:
            info = {"code": result.error_code, "message": result.error_message}
            error = orjson.dumps(info).decode()
    return (
        f'{{"id":"{new_line_id("batch_req_")}","custom_id":{orjson.dumps(custom_id).decode()},'
        f'"response":{{"status_code":{result.status_code},"request_id":"{request_id}",'
        f'"body":{body}}},"error":{error}}}'
    )


def failure_line(
    custom_id: str,
    code: str,
    message: str,
    *,
    shape: ErrorShape = ErrorShape.OPENAI,
) -> str:
    """An error line for a request that never reached the engine."""
    line: dict[str, Any]
    if shape is ErrorShape.VLLM:
        response = {"status_code": 400, "request_id": new_id("vllm-batch-"), "body": None}
        line = {"response": response, "error": message}
    else:
        line = {"response": None, "error": {"code": code, "message": message}}
    return orjson.dumps({"id": new_id("batch_req_"), "custom_id": custom_id, **line}).decode()


def _vllm_error_info(result: EngineResult) -> dict[str, Any]:
    """vLLM's ``ErrorInfo`` (message, type, param, integer code) from an error result."""
    info: Any = None
    with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
        info = orjson.loads(result.body_json).get("error")
    if not isinstance(info, dict):
        info = {}
    return {
        "message": str(info.get("message") or result.error_message or ""),
        "type": str(info.get("type") or result.error_code or "InternalServerError"),
        "param": info.get("param"),
        "code": result.status_code,
    }
