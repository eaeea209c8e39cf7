"""``GET /v1/batches/{id}/deliveries``: webhook deliveries and result-handler runs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


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
    kind: Literal["webhook", "handler"]
    target: str
    """The handler's name, or the webhook URL without its query string."""
    status: Literal["pending", "succeeded", "failed"]
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
