"""Output and error file lines, in OpenAI's batch output shape."""

from __future__ import annotations

import orjson

from vllm_batch.engines.base import EngineResult
from vllm_batch.protocol.ids import new_id


def result_line(custom_id: str, result: EngineResult, request_id: str) -> str:
    """One output (200) or error (non-200) line, without the trailing newline.

    The engine's body is embedded as already-serialised JSON, never parsed again.
    """
    error = "null"
    if not result.ok:
        error = orjson.dumps({"code": result.error_code, "message": result.error_message}).decode()
    return (
        f'{{"id":"{new_id("batch_req_")}","custom_id":{orjson.dumps(custom_id).decode()},'
        f'"response":{{"status_code":{result.status_code},"request_id":"{request_id}",'
        f'"body":{result.body_json}}},"error":{error}}}'
    )


def failure_line(custom_id: str, code: str, message: str) -> str:
    """An error line for a request that never reached the engine (``response`` is null)."""
    return orjson.dumps(
        {
            "id": new_id("batch_req_"),
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        }
    ).decode()
