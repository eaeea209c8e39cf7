"""``file_url`` checks from the text alone, and data: URLs decoded within the size limit.

Fetching over HTTP (the guard, redirects, size and time limits) is tested for real, through
the server and a loopback HTTP server, in ``tests/integration/test_audio_batches.py``.
"""

from __future__ import annotations

import base64

import httpx
import pytest

from vllm_batch.net.file_url import FileFetcher, FileURLError, file_url_problem
from vllm_batch.net.guard import AllowList

AUDIO = b"RIFF" + bytes(range(256)) * 4


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("https://example.com/a.wav", None),
        ("HTTP://example.com/a.wav?sig=x", None),
        ("data:audio/wav;base64,UklGRg==", None),
        ("data:;base64,", None),
        ("", "must be an http(s) URL or a data: URL"),
        (None, "must be an http(s) URL or a data: URL"),
        ("ftp://example.com/a.wav", "not the scheme 'ftp'"),
        ("file:///etc/passwd", "not the scheme 'file'"),
        ("a.wav", "it has no scheme"),
        ("data:audio/wav,UklGRg==", "must be base64"),
        ("data:audio/wav;base64", "must be base64"),
        ("https:///a.wav", "has no host"),
        ("https://u:p@example.com/a.wav", "must not carry credentials"),
    ],
)
def test_file_url_problem(value: object, problem: str | None) -> None:
    found = file_url_problem(value)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


async def test_data_urls_are_decoded_within_the_limit() -> None:
    encoded = base64.b64encode(AUDIO).decode()
    async with httpx.AsyncClient() as client:
        fits = FileFetcher(client, AllowList([]), max_bytes=len(AUDIO), timeout=1)
        assert await fits.fetch(f"data:audio/wav;base64,{encoded}") == AUDIO
        small = FileFetcher(client, AllowList([]), max_bytes=len(AUDIO) - 1, timeout=1)
        with pytest.raises(FileURLError, match=f"limit of {len(AUDIO) - 1} bytes"):
            await small.fetch(f"data:audio/wav;base64,{encoded}")
        with pytest.raises(FileURLError, match="not valid base64"):
            await fits.fetch("data:audio/wav;base64,UklG*g==")
        with pytest.raises(FileURLError, match="not the scheme 'gopher'"):
            await fits.fetch("gopher://example.com/a.wav")
