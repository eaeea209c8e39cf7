"""What ``vllm-batch batches`` and ``vllm-batch files`` share: the SDK client, the exit codes,
one-line errors, JSON printing, progress on stderr, uploads and streamed downloads.

The client talks to any OpenAI-compatible Batch API (this server or OpenAI itself) through the
``openai`` SDK. It imports only the SDK, typer, rich and the standard library, and the SDK
only inside the commands: ``vllm-batch --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar, cast

import typer
from rich.console import Console

if TYPE_CHECKING:
    from openai import OpenAI
    from openai.types import FileObject
    from rich.progress import Progress
    from rich.table import Table

# ---- exit codes (docs/client.md)
EXIT_OK = 0
EXIT_API_ERROR = 1
"""The API answered with an error, or could not be reached (or a local file failed)."""
EXIT_USAGE = 2
"""A usage error: click's own code for a bad flag or argument."""
EXIT_FAILED = 3
EXIT_EXPIRED = 4
EXIT_CANCELLED = 5
EXIT_TIMEOUT = 6
"""``--timeout`` passed before the batch reached a terminal status."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (128 + SIGINT), as shells report it."""

STATUS_EXIT = {
    "completed": EXIT_OK,
    "failed": EXIT_FAILED,
    "expired": EXIT_EXPIRED,
    "cancelled": EXIT_CANCELLED,
}
"""A batch's terminal status → the exit code of a command that waited for it."""

DEFAULT_UPLOAD_THRESHOLD = "100MB"
DEFAULT_PART_SIZE = "64MiB"
"""The SDK's own part size (``upload_file_chunked``), OpenAI's largest part."""
DOWNLOAD_CHUNK = 1024 * 1024

T = TypeVar("T")

stderr = Console(stderr=True, highlight=False, soft_wrap=True)

# ---- options every client command takes
BaseUrl = Annotated[
    str | None,
    typer.Option(
        "--base-url",
        help="The API's base URL, e.g. http://localhost:4080/v1 "
        "(default: $OPENAI_BASE_URL, else OpenAI's).",
        show_default=False,
    ),
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        help="The API key (default: $OPENAI_API_KEY; none needed by a server without keys).",
        show_default=False,
    ),
]
JsonOut = Annotated[
    bool,
    typer.Option("--json", help="Print the object(s) as JSON on stdout; no progress on stdout."),
]
Poll = Annotated[
    float, typer.Option("--poll", min=0.01, help="Seconds between two looks at the batch.")
]
Timeout = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        min=0,
        help=f"Give up waiting after this many seconds (exit code {EXIT_TIMEOUT}).",
        show_default=False,
    ),
]

UploadThreshold = Annotated[
    str,
    typer.Option(
        "--upload-threshold", help="Files this big or bigger go through the Uploads API, in parts."
    ),
]
PartSize = Annotated[str, typer.Option("--part-size", help="The Uploads API's part size.")]
Limit = Annotated[int, typer.Option("--limit", min=1, help="At most this many.")]


def parse_size(text: str) -> int:
    """``"100MB"`` → 100_000_000, ``"64MiB"`` → 67_108_864, ``"4096"`` → 4096."""
    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?)?b?\s*", text.lower())
    if match is None:
        raise typer.BadParameter(f"{text!r} is not a size (e.g. 4096, 100MB, 64MiB)")
    return int(float(match.group(1)) * units[match.group(2) or ""])


def upload_sizes(upload_threshold: str, part_size: str) -> tuple[int, int]:
    """``--upload-threshold`` and ``--part-size`` in bytes (a part is at least 1 byte)."""
    threshold, part = parse_size(upload_threshold), parse_size(part_size)
    if part < 1:
        raise typer.BadParameter("must be at least 1 byte", param_hint="--part-size")
    return threshold, part


def fail(message: str, code: int = EXIT_API_ERROR) -> NoReturn:
    """Print ``error: message`` on one line of stderr and exit with ``code``."""
    one_line = " ".join(message.split())
    print(f"error: {one_line}", file=sys.stderr)
    raise typer.Exit(code)


def describe_api_error(exc: Exception) -> str:
    """One line from an ``openai`` error: the HTTP status, the error code and its message."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        body: dict[str, Any] = exc.body if isinstance(exc.body, dict) else {}
        nested = body.get("error")
        error: dict[str, Any] = nested if isinstance(nested, dict) else body
        message = str(error.get("message") or exc.response.text or exc.message)
        code = error.get("code") or error.get("type") or exc.code
        return f"{exc.status_code}{f' {code}' if code else ''}: {message}"
    if isinstance(exc, openai.APITimeoutError):
        return f"request to {exc.request.url} timed out"
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc.__context__
        detail = f" ({cause})" if cause else ""
        return f"cannot reach {exc.request.url}: {exc.message.rstrip('.')}{detail}"
    return str(exc)


@contextlib.contextmanager
def api_errors() -> Iterator[None]:
    """Turn the SDK's errors, local file errors and Ctrl-C into one line and an exit code."""
    import openai

    try:
        yield
    except openai.OpenAIError as exc:
        fail(describe_api_error(exc))
    except OSError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)


def make_client(base_url: str | None, api_key: str | None) -> OpenAI:
    """The SDK's client: ``--base-url``/``--api-key``, else ``OPENAI_BASE_URL``/``OPENAI_API_KEY``
    as the SDK reads them. A server of ours without keys takes any key: without one, "none"
    is sent to anything but OpenAI."""
    from openai import OpenAI

    url = base_url or os.environ.get("OPENAI_BASE_URL") or None
    key = api_key or os.environ.get("OPENAI_API_KEY") or None
    if key is None:
        if url is None or "api.openai.com" in url:
            fail("no API key: set OPENAI_API_KEY or pass --api-key", EXIT_USAGE)
        key = "none"
    return OpenAI(base_url=url, api_key=key)


@contextlib.contextmanager
def connect(base_url: str | None, api_key: str | None) -> Iterator[OpenAI]:
    """``make_client`` inside ``api_errors``, closed on the way out."""
    with api_errors(), make_client(base_url, api_key) as client:
        yield client


def dump(value: Any) -> Any:
    """An SDK object (or a list of them) as plain JSON data."""
    if isinstance(value, list):
        return [dump(v) for v in value]
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return value


def print_json(value: Any) -> None:
    """``value`` (SDK objects, lists of them, or plain data) as JSON on stdout."""
    sys.stdout.write(json.dumps(dump(value), indent=2) + "\n")
    sys.stdout.flush()


def first(items: Iterable[T], limit: int) -> list[T]:
    """The first ``limit`` items of an SDK page (fetching further pages as needed)."""
    return list(itertools.islice(items, limit))


def emit(value: Any, json_out: bool, text: Callable[[], None]) -> None:
    """``value`` as JSON on stdout with ``--json``; else ``text()`` prints it for a person."""
    if json_out:
        print_json(value)
    else:
        text()


def local_time(stamp: int) -> str:
    """A Unix time as ``YYYY-MM-DD HH:MM:SS``, local time."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def echo(text: str) -> None:
    """A line on stdout."""
    print(text, flush=True)


def print_table(table: Table) -> None:
    """``table`` on stdout: as wide as the terminal, or as its content when piped."""
    Console(highlight=False, width=None if sys.stdout.isatty() else 100_000).print(table)


def show_progress() -> bool:
    """Progress bars go to stderr, and only when it is a terminal."""
    return stderr.is_terminal


def note(message: str, json_out: bool) -> None:
    """A line for a person on stderr (nothing with ``--json`` unless stderr is a terminal)."""
    if not json_out or show_progress():
        stderr.print(message, markup=False)


def transfer_progress() -> Progress:
    """A bytes progress bar on stderr (disabled when stderr is not a terminal)."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        disable=not show_progress(),
        transient=True,
    )


class CountingReader(io.RawIOBase):
    """A binary file that calls ``on_read(n)`` for the bytes read (and ``on_read(-pos)``
    when rewound: the SDK rewinds a file to send it again)."""

    def __init__(self, path: Path, on_read: Callable[[int], None]) -> None:
        super().__init__()
        self._file = path.open("rb")
        self._on_read = on_read
        self.name = path.name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._file.fileno()

    def tell(self) -> int:
        return self._file.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        before = self._file.tell()
        after = self._file.seek(offset, whence)
        self._on_read(after - before)
        return after

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self._on_read(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._file.close()
        super().close()


def upload_file(
    client: OpenAI,
    path: Path,
    *,
    purpose: str,
    threshold: int,
    part_size: int,
) -> FileObject:
    """Upload ``path`` with a progress bar: ``files.create`` below ``threshold`` bytes, the
    Uploads API (parts of ``part_size``, as the SDK's ``upload_file_chunked``) from it."""
    size = path.stat().st_size
    with transfer_progress() as progress:
        task = progress.add_task(f"uploading {path.name}", total=size)
        if size < threshold:
            with CountingReader(path, lambda n: progress.advance(task, n)) as reader:
                return client.files.create(
                    file=(path.name, cast(IO[bytes], reader), "application/jsonl"),
                    purpose=purpose,  # type: ignore[arg-type]
                )
        upload = client.uploads.create(
            bytes=size,
            filename=path.name,
            mime_type="application/jsonl",
            purpose=purpose,  # type: ignore[arg-type]
        )
        part_ids: list[str] = []
        with path.open("rb") as handle:
            while data := handle.read(part_size):
                part_ids.append(client.uploads.parts.create(upload_id=upload.id, data=data).id)
                progress.advance(task, len(data))
        done = client.uploads.complete(upload_id=upload.id, part_ids=part_ids)
    if done.file is None:
        fail(f"upload {upload.id} ended {done.status} without a file")
    return done.file


def download_file(client: OpenAI, file_id: str, target: Path) -> int:
    """Stream the content of ``file_id`` to ``target`` (through ``target.part``, renamed when
    whole) with a progress bar; returns the bytes written."""
    partial = target.with_name(target.name + ".part")
    written = 0
    with (
        client.files.with_streaming_response.content(file_id) as response,
        transfer_progress() as progress,
    ):
        length = response.headers.get("content-length")
        task = progress.add_task(
            f"downloading {target.name}", total=int(length) if length else None
        )
        with partial.open("wb") as out:
            for chunk in response.iter_bytes(DOWNLOAD_CHUNK):
                out.write(chunk)
                written += len(chunk)
                progress.advance(task, len(chunk))
    partial.replace(target)
    return written
