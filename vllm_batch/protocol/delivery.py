"""``GET /v1/batches/{id}/deliveries``: webhook deliveries and result-handler runs."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel


class DeliveryStatus(StrEnum):
    """A delivery's status (the moves: ``batches/states.py``)."""

    PENDING = "pending"  # waiting for its next attempt (or running one under a lease)
    SUCCEEDED = "succeeded"  # an attempt succeeded (terminal)
    FAILED = "failed"  # refused, or out of retries before ``give_up_at`` (terminal)


class DeliveryKind(StrEnum):
    WEBHOOK = "webhook"  # a signed POST of the batch's event
    HANDLER = "handler"  # a result handler run on the batch's results


class DeliveryAttempt(BaseModel):
    number: int
    started_at: float
    finished_at: float
    ok: bool
    status_code: int | None = None
    error: str | None = None


class Delivery(BaseModel):
    id: str
    object: Literal["batch.delivery"] = "batch.delivery"
    batch_id: str
    event_id: str
    event_type: str
    kind: DeliveryKind
    target: str
    """The handler's name, or the webhook URL without its query string."""
    status: DeliveryStatus
    attempts: int
    last_status_code: int | None = None
    last_error: str | None = None
    last_attempt_at: float | None = None
    next_attempt_at: float | None = None
    give_up_at: float
    created_at: float
    finished_at: float | None = None
    history: list[DeliveryAttempt]


class DeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Delivery]
    has_more: bool = False
