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
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx
from standardwebhooks import Webhook

from vllm_batch import __version__
from vllm_batch.batches.states import BatchStatus
from vllm_batch.net.guard import AllowList, Resolver, check_url, pinned, system_resolver

EVENT_TYPES: dict[str, str] = {
    BatchStatus.COMPLETED: "batch.completed",
    BatchStatus.FAILED: "batch.failed",
    BatchStatus.CANCELLED: "batch.cancelled",
    BatchStatus.EXPIRED: "batch.expired",
}
MAX_RESPONSE_BYTES = 4096


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


@dataclass(frozen=True)
class Outcome:
    ok: bool
    status_code: int | None = None
    error: str | None = None
    permanent: bool = False  # no point retrying (the URL is refused by policy)


async def deliver(
    client: httpx.AsyncClient,
    url: str,
    *,
    secret: str,
    event_id: str,
    body: str,
    allow: AllowList,
    resolver: Resolver = system_resolver,
) -> Outcome:
    """POST one signed event; 2xx is success. Never follows redirects; reads ≤ 4 KiB back."""
    from vllm_batch.net.guard import RefusedURL

    try:
        target = await check_url(url, allow, resolver)
    except RefusedURL as exc:
        return Outcome(False, error=f"refused: {exc}", permanent=True)
    pinned_url, host_header, extensions = pinned(target)
    headers = {**signed_headers(secret, event_id, body, dt.datetime.now(tz=dt.UTC)), **host_header}
    try:
        request = client.build_request(
            "POST", pinned_url, content=body.encode(), headers=headers, extensions=extensions
        )
        response = await client.send(request, stream=True, follow_redirects=False)
        try:
            received = 0
            async for part in response.aiter_raw():
                received += len(part)
                if received >= MAX_RESPONSE_BYTES:
                    break
        finally:
            await response.aclose()
    except httpx.HTTPError as exc:
        return Outcome(False, error=f"{type(exc).__name__}: {exc}"[:500] or type(exc).__name__)
    if 200 <= response.status_code < 300:
        return Outcome(True, status_code=response.status_code)
    reason = "redirect not followed" if response.is_redirect else "non-2xx response"
    return Outcome(
        False, status_code=response.status_code, error=f"{reason}: HTTP {response.status_code}"
    )


def display_target(url: str) -> str:
    """A webhook URL for listings: query and fragment (often tokens) dropped."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))
