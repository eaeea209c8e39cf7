"""Sending one signed batch event (``protocol/webhook_event.py``) to a webhook URL.

The URL passes the outbound guard (``net/guard.py``) first and is posted to the address
that was checked; redirects are never followed and at most 4 KiB of the answer is read.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx

from vllm_batch.net.guard import AllowList, RefusedURL, Resolver, check_url, pinned, system_resolver
from vllm_batch.protocol.webhook_event import signed_headers

MAX_RESPONSE_BYTES = 4096


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
