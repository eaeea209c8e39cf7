"""Input and output locations: local paths or http(s) URLs, and ``--resume`` scanning.

URLs are streamed to and from local files (never held in memory): a URL input is downloaded
to a temporary file before the pre-flight pass; a URL output is written to a temporary file
and uploaded with HTTP PUT once the run is complete. Transfers are retried with exponential
backoff and jitter (``vllm_batch.retry``).

URLs may be pre-signed (``?X-Amz-Signature=...``): ``redact`` strips query strings and user
info from anything logged or raised here, and ``redact_http_logs`` does the same for httpx's
own request log lines.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import orjson

from vllm_batch.pipeline.input import iter_lines
from vllm_batch.retry import describe, retrying_sync

log = logging.getLogger(__name__)

UPLOAD_ATTEMPTS = 5
DOWNLOAD_ATTEMPTS = 3
BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0
CHUNK_BYTES = 1024 * 1024
TIMEOUT = httpx.Timeout(60.0, read=600.0, write=600.0)


class TransferError(Exception):
    """A download or upload failed for good."""


class ResumeMismatch(Exception):
    """The existing output is not a prefix of this input's output."""


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


_URL_SECRETS = re.compile(
    r"(?P<head>https?://)(?:[^/?#\s@]*@)?(?P<rest>[^?#\s'\"]*)(?:[?#][^\s'\"]*)?",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with every http(s) URL's query string, fragment and user info removed.

    ``https://u:p@host/out.jsonl?X-Amz-Signature=...`` → ``https://host/out.jsonl?…``.
    """

    def strip(match: re.Match[str]) -> str:
        hidden = match.group(0) != match.group("head") + match.group("rest")
        return match.group("head") + match.group("rest") + ("?…" if hidden else "")

    return _URL_SECRETS.sub(strip, text)


class RedactUrls(logging.Filter):
    """Rewrites a record's message with ``redact`` (for loggers that print request URLs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def redact_http_logs(logger: logging.Logger | None = None) -> None:
    """Redact URLs in ``logger``'s records (default: httpx's ``HTTP Request: PUT <url>``)."""
    logger = logger or logging.getLogger("httpx")
    if not any(isinstance(existing, RedactUrls) for existing in logger.filters):
        logger.addFilter(RedactUrls())


redact_http_logs(log)  # retry warnings quote httpx errors, which contain the URL


def temp_path(directory: str | None, prefix: str) -> Path:
    """A new empty file for a download or an output to upload."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".jsonl", dir=directory)
    os.close(fd)
    return Path(name)


class _HttpStatus(Exception):
    """An HTTP error status, as retries log it (``HTTP 503``: no URL, no response text)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def _retryable(error: BaseException) -> bool:
    """Network errors, 5xx, 408 and 429 are worth another attempt; other statuses are not."""
    if isinstance(error, _HttpStatus):
        return error.status >= 500 or error.status in (408, 429)
    return isinstance(error, httpx.HTTPError)


def _with_retries(
    what: str, attempts: int, action: Callable[[], None], sleep: Callable[[float], None] | None
) -> None:
    """Run ``action`` with backoff; ``TransferError`` (with ``what`` redacted) when it gives up."""
    what = redact(what)

    def once() -> None:
        try:
            action()
        except httpx.HTTPStatusError as exc:
            raise _HttpStatus(exc.response.status_code) from None

    try:
        for attempt in retrying_sync(
            on=_retryable,
            attempts=attempts,
            max_wait=MAX_BACKOFF_SECONDS,
            first_wait=BACKOFF_SECONDS,
            log=log,
            what=what,
            sleep=sleep,
        ):
            with attempt:
                once()
    except _HttpStatus as exc:
        if not _retryable(exc):
            raise TransferError(f"{what} failed: {exc}") from None
        raise TransferError(f"{what} failed after {attempts} attempts: {exc}") from None
    except httpx.HTTPError as exc:
        error = redact(describe(exc))
        raise TransferError(f"{what} failed after {attempts} attempts: {error}") from None


def download(
    url: str,
    dest: Path,
    *,
    attempts: int = DOWNLOAD_ATTEMPTS,
    sleep: Callable[[float], None] | None = None,
) -> None:
    """Stream ``url`` into ``dest`` (overwritten on every attempt)."""

    def attempt() -> None:
        with (
            httpx.stream("GET", url, follow_redirects=True, timeout=TIMEOUT) as response,
            dest.open("wb") as out,
        ):
            response.raise_for_status()
            for chunk in response.iter_bytes(CHUNK_BYTES):
                out.write(chunk)

    log.info("downloading input from %s", redact(url))
    _with_retries(f"download of {url}", attempts, attempt, sleep)


def _chunks(handle: BinaryIO) -> Iterator[bytes]:
    while chunk := handle.read(CHUNK_BYTES):
        yield chunk


def upload(
    path: Path,
    url: str,
    *,
    attempts: int = UPLOAD_ATTEMPTS,
    sleep: Callable[[float], None] | None = None,
) -> None:
    """PUT the file at ``path`` to ``url``, streaming its body, retrying with backoff."""
    size = path.stat().st_size
    headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}

    def attempt() -> None:
        with path.open("rb") as handle:
            response = httpx.put(url, content=_chunks(handle), headers=headers, timeout=TIMEOUT)
        response.raise_for_status()

    log.info("uploading output (%d bytes) to %s", size, redact(url))
    _with_retries(f"upload to {url}", attempts, attempt, sleep)


def _custom_id(raw: bytes) -> Any:
    value = orjson.loads(raw)
    return value.get("custom_id") if isinstance(value, dict) else None


def scan_resume(output: Path, input_path: Path) -> int:
    """How many requests ``output`` already holds; truncates a partial last line.

    Output is written in input order, so what is done is a prefix: its complete lines must
    carry the custom_ids of the input's first requests, in order.
    """
    if not output.exists():
        return 0
    done = 0
    complete_bytes = 0
    with output.open("r+b") as out, input_path.open("rb") as inp:
        requests = iter_lines(inp)
        for raw in out:
            if not raw.endswith(b"\n"):
                log.info("dropping a partial last output line (%d bytes)", len(raw))
                break
            try:
                got = _custom_id(raw)
            except orjson.JSONDecodeError:
                got = None
            if not isinstance(got, str):
                raise ResumeMismatch(f"output line {done + 1} is not a result line")
            expected = next(requests, None)
            if expected is None:
                raise ResumeMismatch(
                    f"the output has more lines than the input has requests ({done})"
                )
            number, _offset, request = expected
            want = _custom_id(request)
            if got != want:
                raise ResumeMismatch(
                    f"output line {done + 1} has custom_id {got!r} but input line {number} "
                    f"has {want!r}; the output is not from this input"
                )
            done += 1
            complete_bytes += len(raw)
        out.truncate(complete_bytes)
    return done
