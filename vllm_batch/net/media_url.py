"""Media URLs inside request bodies (chat images, audio, video): checked before vLLM fetches.

vLLM fetches the URL of an ``image_url``, ``input_image``, ``audio_url`` or ``video_url``
content part itself (``vllm/renderers/chat_utils.py``, ``MM_PARSER_MAP``), wherever a body
carries content parts: chat ``messages``, Responses ``input``, multimodal embeddings and
scores. ``MediaGuard.check`` finds every such URL in a body (``media_urls``) and refuses:

- ``data:`` URLs pass (nothing is fetched); ``input_audio`` carries base64 data, no URL;
- ``http(s)`` URLs go through ``guard.check_url``, as webhooks and audio ``file_url`` do: no
  loopback, private, link-local, metadata, ... target unless ``VLLM_BATCH_MEDIA_ALLOWED_HOSTS``
  names it, no credentials, and a host that URL parsers disagree on is refused;
- ``file:`` URLs are refused (the engine is never given ``--allowed-local-media-path``), and
  so is every other scheme.

Host names are resolved off the event loop (``guard.system_resolver``), each at most once per
``CACHE_SECONDS`` per guard (``CachingResolver``), so a batch of lines naming one host costs
one lookup.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from vllm_batch.net.guard import AllowList, RefusedURL, Resolver, check_url, system_resolver

ALLOW_SETTING = "VLLM_BATCH_MEDIA_ALLOWED_HOSTS"
ERROR_CODE = "url_not_allowed"
MEDIA_KEYS = ("image_url", "audio_url", "video_url")
"""Content-part keys whose value (a string, or an object's ``url``) vLLM fetches."""
CACHE_SECONDS = 60.0
CACHE_ENTRIES = 1024
SHOWN_URL_CHARS = 200


@dataclass(frozen=True)
class MediaRefusal:
    """Why a body may not be run: the refused URL's place in the body and the reason."""

    param: str
    message: str


def media_urls(body: Any) -> Iterator[tuple[str, str]]:
    """Every media URL in ``body`` as (its path, e.g. ``messages[0].content[1].image_url.url``,
    the URL), in body order. Non-string values are left to the engine's own validation."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            children: list[tuple[str, Any]] = []
            for key, child in value.items():
                if key not in MEDIA_KEYS and not isinstance(child, dict | list):
                    continue
                where = f"{path}.{key}" if path else str(key)
                if key in MEDIA_KEYS:
                    if isinstance(child, str):
                        yield where, child
                        continue
                    if isinstance(child, dict) and isinstance(child.get("url"), str):
                        yield f"{where}.url", child["url"]
                        continue
                if isinstance(child, dict | list):
                    children.append((where, child))
            stack.extend(reversed(children))
        elif isinstance(value, list):  # scalars (token ids, texts) are skipped, not visited
            for i in range(len(value) - 1, -1, -1):
                if isinstance(value[i], dict | list):
                    stack.append((f"{path}[{i}]", value[i]))


def shown(url: str) -> str:
    """``url`` for a message: without its query or fragment, at most ``SHOWN_URL_CHARS``."""
    text = url.split("?", 1)[0].split("#", 1)[0]
    return text if len(text) <= SHOWN_URL_CHARS else text[:SHOWN_URL_CHARS] + "..."


def scheme_problem(url: str) -> str | None:
    """Why ``url`` is refused from its text alone; None: a data URL, or an http(s) URL that
    must still be resolved and checked."""
    scheme, colon, _ = url.partition(":")
    scheme = scheme.lower() if colon else ""
    if scheme == "data":
        return None
    if scheme == "file":
        return "file: URLs are not allowed (the engine reads no local media files)"
    if not scheme:
        return "must be an absolute http, https or data URL (it has no scheme)"
    if scheme not in ("http", "https"):
        return f"must be an http, https or data URL, not the scheme {scheme!r}"
    if url != url.strip():
        return "must not end with white space"
    return _parser_disagreement(url)


def _parser_disagreement(url: str) -> str | None:
    """A URL whose host urllib3 (what vLLM parses media URLs with) reads differently."""
    try:
        from urllib3.util import parse_url as urllib3_parse
    except ImportError:  # pragma: no cover - urllib3 comes with vLLM
        return None
    try:
        theirs = (urllib3_parse(url).host or "").strip("[]").lower()
        ours = (urlsplit(url).hostname or "").lower()
    except ValueError:
        return "is not a valid URL"
    if theirs != ours:
        return "is ambiguous (URL parsers disagree on its host)"
    return None


class CachingResolver:
    """A ``Resolver`` that asks ``resolver`` once per host and port per ``ttl`` seconds;
    concurrent lookups of one host share one answer (or one failure)."""

    def __init__(
        self,
        resolver: Resolver = system_resolver,
        ttl: float = CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resolver = resolver
        self._ttl = ttl
        self._clock = clock
        self._entries: dict[tuple[str, int], tuple[float, asyncio.Future[list[str]]]] = {}

    async def __call__(self, host: str, port: int) -> list[str]:
        key = (host.lower(), port)
        now = self._clock()
        entry = self._entries.get(key)
        if entry is None or entry[0] <= now:
            if len(self._entries) >= CACHE_ENTRIES:
                self._evict(now)
            task = asyncio.ensure_future(self._resolver(host, port))
            task.add_done_callback(_retrieve)
            entry = (now + self._ttl, task)
            self._entries[key] = entry
        return list(await asyncio.shield(entry[1]))

    def _evict(self, now: float) -> None:
        for key in [k for k, (expires, _) in self._entries.items() if expires <= now]:
            del self._entries[key]
        while len(self._entries) >= CACHE_ENTRIES:  # the oldest first
            del self._entries[next(iter(self._entries))]


def _retrieve(future: asyncio.Future[list[str]]) -> None:
    """Mark a lookup's failure as seen even if every line awaiting it was cancelled."""
    if not future.cancelled():
        future.exception()


class MediaGuard:
    """Checks the media URLs of request bodies (see the module docstring)."""

    def __init__(
        self, allow: Sequence[str] | AllowList = (), resolver: Resolver | None = None
    ) -> None:
        self.allow = allow if isinstance(allow, AllowList) else AllowList(allow)
        self.resolver: Resolver = resolver if resolver is not None else CachingResolver()

    async def check(self, body: Any) -> MediaRefusal | None:
        """The first media URL in ``body`` that may not be fetched, or None."""
        for param, url in media_urls(body):
            problem = scheme_problem(url)
            if problem is None and url[:5].lower() != "data:":
                try:
                    await check_url(url, self.allow, self.resolver, allow_setting=ALLOW_SETTING)
                except RefusedURL as exc:
                    problem = str(exc)
            if problem is not None:
                return MediaRefusal(param, f"{param}: {shown(url)!r} {problem}.")
        return None
