"""Calling one of vLLM's OpenAI serving objects, and error results in OpenAI's shape.

``call_serving`` is the one place that sorts a serving call's outcome: a response, a bad
request (vLLM returns an ``ErrorResponse`` or raises; both come back as ``ErrorResponse``),
a broken engine (raised as ``EngineFailure``/``EngineOutOfMemory``: the work is retried,
never failed), or an aborted request (``CancelledError``: not done). vLLM is imported lazily.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import orjson

from vllm_batch.engines.engine import (
    EngineFailure,
    EngineOutOfMemory,
    EngineResult,
    is_cuda_oom,
    is_oom_message,
)


async def call_serving(call: Awaitable[Any], serving: Any) -> Any:
    """Await ``call`` (a method of the serving object ``serving``): its response, or vLLM's
    ``ErrorResponse`` for a bad request."""
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    from vllm.v1.engine.exceptions import EngineDeadError

    try:
        response = await call
    except EngineDeadError as exc:
        failure = EngineOutOfMemory if is_cuda_oom(exc) else EngineFailure
        raise failure(str(exc)) from exc
    except Exception as exc:  # vLLM raises for some bad requests instead of returning
        if is_cuda_oom(exc):
            raise EngineOutOfMemory(str(exc)) from exc
        response = create_error_response(exc)
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        # vLLM turns a cancelled request into a "Client disconnected" error; for us an
        # aborted request is simply not done, so let the cancellation through.
        raise asyncio.CancelledError
    if isinstance(response, ErrorResponse):
        info = response.error
        client = getattr(serving, "engine_client", None)
        if info.code >= 500 and getattr(client, "errored", False):
            failure = EngineOutOfMemory if is_oom_message(info.message) else EngineFailure
            raise failure(info.message)
    return response


def error_response_result(response: Any, param: str | None = None) -> EngineResult:
    """vLLM's ``ErrorResponse`` as an error result (``param`` when vLLM names none)."""
    info = response.error
    return error_result(info.code, info.type, info.message, info.param or param)


def streaming_refused() -> EngineResult:
    """The error of a line that asks for ``stream``: a batch answer is one body."""
    return error_result(
        400, "invalid_request_error", "Streaming is not supported in batch requests.", "stream"
    )


def error_result(
    status: int, err_type: str, message: str, param: str | None = None
) -> EngineResult:
    """An error outcome with an OpenAI error body."""
    code = _error_code(err_type)
    body = {"error": {"message": message, "type": err_type, "param": param, "code": code}}
    return EngineResult(
        status_code=status,
        body_json=orjson.dumps(body).decode(),
        error_code=code,
        error_message=message,
    )


def _error_code(err_type: str) -> str:
    """vLLM's error types (``BadRequestError``) as OpenAI snake-case codes."""
    mapping = {
        "BadRequestError": "invalid_request_error",
        "NotFoundError": "not_found_error",
        "UnprocessableEntityError": "invalid_request_error",
        "InternalServerError": "server_error",
        "ServiceUnavailableError": "server_error",
    }
    return mapping.get(err_type, err_type)


TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict"})


def validation_error_result(exc: Any) -> EngineResult:
    """A 400 for pydantic's ``ValidationError`` on a request body: its first error."""
    first = exc.errors()[0]
    return error_result(
        400,
        "invalid_request_error",
        f"Invalid request body: {first.get('msg')}",
        body_param(first.get("loc", ())),
    )


def body_param(loc: tuple[Any, ...]) -> str | None:
    """A dotted parameter name from a pydantic location, without union/validator tags."""
    parts = [
        str(p)
        for p in loc
        if isinstance(p, int) or (str(p).isidentifier() and str(p) not in TYPE_NAMES)
    ]
    return ".".join(parts) or None
