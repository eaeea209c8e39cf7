"""Batch webhook events, as OpenAI sends them, signed per Standard Webhooks.

Payload: ``{"object": "event", "id": "evt_…", "type": "batch.completed", "created_at": …,
"data": {"id": "batch_…"}}``; headers ``webhook-id``, ``webhook-timestamp`` and
``webhook-signature: v1,<base64 HMAC-SHA256>``. Each attempt is signed afresh (receivers
reject stale timestamps); the ``webhook-id`` stays the event id, so receivers can dedupe.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets

from standardwebhooks import Webhook

from vllm_batch import __version__

EVENT_TYPES: dict[str, str] = {
    "completed": "batch.completed",
    "failed": "batch.failed",
    "cancelled": "batch.cancelled",
    "expired": "batch.expired",
}
"""The event a batch's final status sends."""


def new_secret() -> str:
    """A fresh ``whsec_`` secret (32 random bytes)."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def check_secret(secret: str) -> str:
    """``secret`` if it is ``whsec_`` + base64 of 24-64 bytes, else ``ValueError``.

    The message never echoes the secret.
    """
    body = secret.removeprefix("whsec_") if secret.startswith("whsec_") else None
    try:
        size = len(base64.b64decode(body or "", validate=True))
    except ValueError:
        size = 0
    if not 24 <= size <= 64:
        raise ValueError(
            "VLLM_BATCH_WEBHOOK_SECRET must be whsec_ followed by base64 of 24-64 random bytes "
            "(leave it unset to have one generated)"
        )
    return secret


def event_body(event_id: str, event_type: str, created_at: int, batch_id: str) -> str:
    """The JSON body, exactly OpenAI's batch event shape."""
    return json.dumps(
        {
            "object": "event",
            "id": event_id,
            "type": event_type,
            "created_at": created_at,
            "data": {"id": batch_id},
        },
        separators=(",", ":"),
    )


def signed_headers(secret: str, event_id: str, body: str, when: dt.datetime) -> dict[str, str]:
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": Webhook(secret).sign(event_id, when, body),
        "content-type": "application/json",
        "user-agent": f"vllm-batch/{__version__}",
    }
