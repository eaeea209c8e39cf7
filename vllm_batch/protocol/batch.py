"""Batch wire types, field for field as openai-python's ``types/batch*.py``."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field


class BatchStatus(StrEnum):
    """A batch's status, OpenAI's values (the moves: ``batches/states.py``)."""

    VALIDATING = "validating"  # input file being checked
    FAILED = "failed"  # the input file was invalid (terminal)
    IN_PROGRESS = "in_progress"  # chunks queued or running
    FINALIZING = "finalizing"  # every line done; output files being written
    COMPLETED = "completed"  # output files written (terminal)
    EXPIRED = "expired"  # completion window passed; unfinished lines are errors (terminal)
    CANCELLING = "cancelling"  # cancel requested; waiting for running chunks to stop
    CANCELLED = "cancelled"  # cancelled; finished lines kept (terminal)


class BatchError(BaseModel):
    code: str | None = None
    line: int | None = None
    message: str | None = None
    param: str | None = None


class Errors(BaseModel):
    data: list[BatchError] | None = None
    object: str | None = "list"


class BatchRequestCounts(BaseModel):
    completed: int = 0
    failed: int = 0
    total: int = 0


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class BatchUsage(BaseModel):
    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int = 0


class Batch(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: Errors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts = Field(default_factory=BatchRequestCounts)
    metadata: dict[str, str] | None = None
    model: str | None = None
    usage: BatchUsage | None = None


class ExpiresAfter(BaseModel):
    anchor: Literal["created_at"]
    seconds: int = Field(ge=3600, le=30 * 24 * 3600)


def storable_text(value: str) -> str:
    """Text a database can store: no NUL character, no lone surrogate (``"\\ud800"``)."""
    if "\x00" in value:
        raise ValueError("NUL characters are not allowed")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("invalid Unicode (a lone surrogate)") from None
    return value


StorableText = Annotated[str, AfterValidator(storable_text)]


class BatchCreateRequest(BaseModel):
    """Body of ``POST /v1/batches``; limits are checked in the service for exact messages."""

    input_file_id: StorableText
    endpoint: StorableText
    completion_window: StorableText
    metadata: dict[StorableText, StorableText] | None = None
    output_expires_after: ExpiresAfter | None = None
