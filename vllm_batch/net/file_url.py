"""The audio endpoints' ``file_url``: checked from its text, then fetched within limits.

A ``file_url`` is an http(s) URL or a base64 ``data:`` URL, as ``vllm run-batch`` takes it.

- An http(s) URL passes ``guard.py`` first (no private, loopback or link-local target unless
  ``VLLM_BATCH_AUDIO_ALLOWED_HOSTS`` names it) and is fetched from the address that was
  checked; a redirect (at most ``MAX_REDIRECTS``) is checked the same way before it is
  followed.
- The whole fetch (resolving, connecting, redirects, every byte) must end within
  ``audio_fetch_timeout`` seconds, and the body must be at most ``audio_max_bytes``: a
  ``Content-Length`` above it is refused before reading, a longer body is cut off there.
- A data URL's decoded size is held to the same limit before it is decoded.

Every failure raises ``FileURLError``, whose message says what went wrong.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import httpx

from vllm_batch.net.guard import (
    AllowList,
    RefusedURL,
    Resolver,
    check_url,
    parse_url,
    pinned,
    system_resolver,
)

MAX_REDIRECTS = 3
ALLOW_SETTING = "VLLM_BATCH_AUDIO_ALLOWED_HOSTS"
PARAM = "file_url"


class FileURLError(ValueError):
    """The ``file_url`` cannot be used (refused, unreachable, too large or too slow)."""


def file_url_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a ``file_url``, from its text alone (None: it may be fetched)."""
    if not isinstance(value, str) or not value.strip():
        return "'file_url' must be an http(s) URL or a data: URL."
    scheme, colon, rest = value.partition(":")
    scheme = scheme.lower() if colon else ""
    if scheme == "data":
        header, comma, _ = rest.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            return "A data: 'file_url' must be base64: data:<media type>;base64,<data>."
        return None
    if scheme in ("http", "https"):
        try:
            parse_url(value)
        except RefusedURL as exc:
            return f"'file_url' {exc}."
        return None
    if not scheme:
        return "'file_url' must be an absolute http, https or data URL (it has no scheme)."
    return f"'file_url' must be an http, https or data URL, not the scheme {scheme!r}."


def too_large(limit: int, size: int | None = None) -> str:
    got = f" ({size} bytes)" if size is not None else ""
    return (
        f"The audio at 'file_url' is larger than the limit of {limit} bytes{got}; "
        "see VLLM_BATCH_AUDIO_MAX_BYTES."
    )


@dataclass(frozen=True)
class FileFetcher:
    """Fetches ``file_url`` values with one shared HTTP client (see the module docstring)."""

    client: httpx.AsyncClient
    allow: AllowList
    max_bytes: int
    timeout: float
    resolver: Resolver = system_resolver

    async def fetch(self, url: str) -> bytes:
        """The bytes at ``url``; ``FileURLError`` if they cannot be had within the limits."""
        problem = file_url_problem(url)
        if problem is not None:
            raise FileURLError(problem)
        if url[:5].lower() == "data:":
            return self._decode(url.partition(",")[2])
        try:
            async with asyncio.timeout(self.timeout):
                return await self._download(url)
        except TimeoutError:
            raise FileURLError(
                f"Fetching 'file_url' took longer than {self.timeout:g} s "
                "(VLLM_BATCH_AUDIO_FETCH_TIMEOUT)."
            ) from None

    def _decode(self, data: str) -> bytes:
        size = len(data.rstrip("=")) * 3 // 4
        if size > self.max_bytes:
            raise FileURLError(too_large(self.max_bytes, size))
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise FileURLError("The data: 'file_url' is not valid base64.") from None

    async def _download(self, url: str) -> bytes:
        for hop in range(MAX_REDIRECTS + 1):
            what = "'file_url'" if hop == 0 else f"'file_url' redirects to {url}, which"
            try:
                target = await check_url(
                    url, self.allow, self.resolver, allow_setting=ALLOW_SETTING
                )
            except RefusedURL as exc:
                raise FileURLError(f"{what} {exc}.") from None
            address, headers, extensions = pinned(target)
            try:
                request = self.client.build_request(
                    "GET", address, headers=headers, extensions=extensions
                )
                response = await self.client.send(request, stream=True, follow_redirects=False)
                try:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    return await self._read(response)
                finally:
                    await response.aclose()
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                reason = str(exc) or type(exc).__name__
                raise FileURLError(f"Fetching 'file_url' failed: {reason}"[:500]) from None
        raise FileURLError(f"'file_url' redirects more than {MAX_REDIRECTS} times.")

    async def _read(self, response: httpx.Response) -> bytes:
        if response.status_code != 200:
            raise FileURLError(f"Fetching 'file_url' failed: HTTP {response.status_code}.")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise FileURLError(too_large(self.max_bytes, int(declared)))
        parts: list[bytes] = []
        size = 0
        async for part in response.aiter_bytes():
            size += len(part)
            if size > self.max_bytes:
                raise FileURLError(too_large(self.max_bytes))
            parts.append(part)
        return b"".join(parts)
