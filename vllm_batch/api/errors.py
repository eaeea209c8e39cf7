"""One way to report an error: ``APIError`` → OpenAI's ``{"error": {...}}`` body.

Every handler raises ``APIError``; FastAPI's own validation errors, unknown routes and
unexpected exceptions are rendered in the same shape. A write the file storage refuses for
lack of space (``StorageFull``, from any route) is a 507 naming the storage.
"""

from __future__ import annotations

import logging
import tempfile
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vllm_batch.protocol.error import ErrorDetail, ErrorResponse
from vllm_batch.storage.refusal import StorageFull, storage_refusal

log = logging.getLogger(__name__)
T = TypeVar("T")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    503: "server_error",
}


def spool_full(exc: BaseException) -> StorageFull | None:
    """The cause of a body FastAPI could not parse, if it was the temporary directory (where
    multipart uploads are spooled) running out of space."""
    cause = exc.__cause__
    while cause is not None:
        refusal = storage_refusal(cause, f"temporary directory {tempfile.gettempdir()}")
        if refusal is not None:
            return refusal
        cause = cause.__cause__ or cause.__context__
    return None


class APIError(Exception):
    """An HTTP error with an OpenAI error body."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def not_found(kind: str, object_id: str) -> APIError:
    return APIError(404, f"No such {kind}: '{object_id}'.", code="not_found")


def found(row: T | None, kind: str, object_id: str) -> T:
    """``row``, or a 404 naming ``kind`` and ``object_id`` when there is none."""
    if row is None:
        raise not_found(kind, object_id)
    return row


def invalid(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    """A 400 for a request field (``param``) that cannot be used."""
    return APIError(400, message, param=param, code=code)


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    detail = ErrorDetail(
        message=message, type=ERROR_TYPES.get(status, "server_error"), param=param, code=code
    )
    return JSONResponse(ErrorResponse(error=detail).model_dump(), status_code=status)


def database_busy(exc: BaseException) -> JSONResponse:
    """503 when no pooled database connection became free within ``db_pool_timeout``."""
    log.warning("API database pool exhausted: %s", str(exc).splitlines()[0][:200])
    response = error_response(
        503,
        "The server is busy: no database connection became free in time. Retry shortly.",
        code="database_busy",
    )
    response.headers["Retry-After"] = "1"
    return response


def install_error_handlers(app: FastAPI) -> None:
    from sqlalchemy import exc as sa_exc  # here: `vllm-batch run` imports this module, no DB

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(StorageFull)
    async def _storage_full(_request: Request, exc: StorageFull) -> JSONResponse:
        log.warning("storage refused a write: %s", exc)
        return error_response(
            507,
            f"{exc.message} Nothing was stored; retry once space is freed.",
            code="storage_full",
        )

    @app.exception_handler(sa_exc.TimeoutError)
    async def _pool_exhausted(_request: Request, exc: sa_exc.TimeoutError) -> JSONResponse:
        return database_busy(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
        param = ".".join(loc) or None
        message = f"Invalid value for '{param}': {first.get('msg')}" if param else str(exc)
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        spooled = spool_full(exc) if exc.status_code == 400 else None
        if spooled is not None:  # FastAPI's "error parsing the body": its spool is full
            return await _storage_full(request, spooled)
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        if exc.status_code == 404:
            message = "Not found: no such route."
        return error_response(exc.status_code, message)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(
            500, "The server had an error processing your request.", code="server_error"
        )
