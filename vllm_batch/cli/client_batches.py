"""``vllm-batch batches``: submit, list, get, cancel, wait for and download batches on any
OpenAI-compatible Batch API (exit codes: ``client_common``, docs/client.md)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from vllm_batch.cli.client_common import (
    DEFAULT_PART_SIZE,
    DEFAULT_UPLOAD_THRESHOLD,
    EXIT_OK,
    EXIT_TIMEOUT,
    STATUS_EXIT,
    ApiKey,
    BaseUrl,
    JsonOut,
    Limit,
    PartSize,
    Poll,
    Timeout,
    UploadThreshold,
    connect,
    download_file,
    echo,
    emit,
    first,
    local_time,
    note,
    print_json,
    print_table,
    show_progress,
    stderr,
    upload_file,
    upload_sizes,
)

if TYPE_CHECKING:
    from openai import OpenAI
    from openai.types import Batch
    from rich.progress import Progress

batches_app = typer.Typer(
    help="Submit, follow and download batches on any OpenAI-compatible Batch API.",
    no_args_is_help=True,
)

TERMINAL = frozenset(STATUS_EXIT)
DEFAULT_POLL = 2.0

BatchId = Annotated[str, typer.Argument(help="The batch's id.", show_default=False)]
Download = Annotated[
    Path | None,
    typer.Option(
        "--download",
        file_okay=False,
        help="Then download the output and error files into this directory (implies --wait).",
        show_default=False,
    ),
]


def batch_progress() -> Progress:
    """The live bar of a batch on stderr: status, lines done/total, failed, rate, ETA."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        Task,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        """Lines finished per second (rich's estimate over the last 30 s)."""

        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            rate = "" if speed is None else f"{speed:.1f} lines/s"
            return Text(rate, style="progress.data.speed")

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("failed {task.fields[failed]}"),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=stderr,
        disable=not show_progress(),
    )


def counts(batch: Batch) -> tuple[int, int, int]:
    """(done, failed, total) lines of ``batch`` (zeros before validation counted them)."""
    rc = batch.request_counts
    if rc is None:
        return 0, 0, 0
    return rc.completed + rc.failed, rc.failed, rc.total


def summary(batch: Batch) -> str:
    """``batch_x completed: 40/40 lines, 1 failed`` (with the files it has)."""
    done, failed, total = counts(batch)
    text = f"{batch.id} {batch.status}: {done}/{total} lines, {failed} failed"
    if batch.output_file_id:
        text += f"; output {batch.output_file_id}"
    if batch.error_file_id:
        text += f"; errors {batch.error_file_id}"
    if batch.errors and batch.errors.data:
        first = batch.errors.data[0]
        more = len(batch.errors.data) - 1
        where = f" (line {first.line})" if first.line else ""
        text += f"; {first.code}{where}: {first.message}" + (f" (+{more} more)" if more else "")
    return text


def wait_for(
    client: OpenAI, batch: Batch, *, poll: float, timeout: float | None, json_out: bool
) -> tuple[Batch, bool]:
    """Poll ``batch`` until a terminal status, with a live bar on stderr (a line per status
    change when stderr is not a terminal); returns the last batch seen and whether it ended
    (False: ``timeout`` seconds passed)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    progress = batch_progress()
    last_status = None
    with progress:
        task = progress.add_task(batch.id, total=None, failed=0)
        while True:
            done, failed, total = counts(batch)
            progress.update(
                task,
                description=f"{batch.id} {batch.status}",
                completed=done,
                total=total or None,
                failed=failed,
            )
            if batch.status not in (last_status, *TERMINAL) and not show_progress():
                note(f"{batch.id} {batch.status}: {done}/{total} lines, {failed} failed", json_out)
            last_status = batch.status
            if batch.status in TERMINAL:
                return batch, True
            if deadline is not None and time.monotonic() >= deadline:
                return batch, False
            pause = poll if deadline is None else min(poll, max(deadline - time.monotonic(), 0))
            time.sleep(pause)
            batch = client.batches.retrieve(batch.id)


def download_batch(client: OpenAI, batch: Batch, directory: Path, json_out: bool) -> list[Path]:
    """Stream ``batch``'s output and error files into ``directory`` as
    ``<batch_id>_output.jsonl`` and ``<batch_id>_error.jsonl``; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, file_id in (("output", batch.output_file_id), ("error", batch.error_file_id)):
        if not file_id:
            continue
        target = directory / f"{batch.id}_{kind}.jsonl"
        size = download_file(client, file_id, target)
        note(f"wrote {target} ({size} bytes)", json_out)
        written.append(target)
    if not written:
        note(f"{batch.id} ({batch.status}) has no output or error file yet", json_out)
    return written


def finish(
    client: OpenAI,
    batch: Batch,
    *,
    poll: float,
    timeout: float | None,
    download: Path | None,
    json_out: bool,
) -> int:
    """Wait for ``batch``, download its files into ``download`` (if given), print it; returns
    the exit code of its terminal status (``EXIT_TIMEOUT`` if ``timeout`` passed first)."""
    batch, ended = wait_for(client, batch, poll=poll, timeout=timeout, json_out=json_out)
    if ended and download is not None:
        download_batch(client, batch, download, json_out)
    if json_out:
        print_json(batch)
    else:
        echo(summary(batch))
    if not ended:
        print(
            f"error: timed out after {timeout:g}s; {batch.id} is still {batch.status}",
            file=sys.stderr,
        )
        return EXIT_TIMEOUT
    return STATUS_EXIT[batch.status]


def parse_metadata(pairs: list[str]) -> dict[str, str] | None:
    """``["k=v", ...]`` → ``{"k": "v", ...}`` (None without any)."""
    metadata = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--metadata")
        metadata[key] = value
    return metadata or None


@batches_app.command("submit")
def submit(
    file: Annotated[
        Path,
        typer.Argument(
            exists=True, dir_okay=False, readable=True, help="The batch input file (JSONL)."
        ),
    ],
    endpoint: Annotated[
        str, typer.Option("--endpoint", help="The endpoint every line calls.")
    ] = "/v1/chat/completions",
    window: Annotated[str, typer.Option("--window", help="The completion window.")] = "24h",
    metadata: Annotated[
        list[str] | None,
        typer.Option("--metadata", help="KEY=VALUE metadata (repeatable).", show_default=False),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the batch until it ends; exit by its status.")
    ] = False,
    download: Download = None,
    upload_threshold: UploadThreshold = DEFAULT_UPLOAD_THRESHOLD,
    part_size: PartSize = DEFAULT_PART_SIZE,
    poll: Poll = DEFAULT_POLL,
    timeout: Timeout = None,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    json_out: JsonOut = False,
) -> None:
    """Upload FILE and create a batch from it (then, with --wait, follow it to its end)."""
    threshold, part = upload_sizes(upload_threshold, part_size)
    meta = parse_metadata(metadata or [])
    code = EXIT_OK
    with connect(base_url, api_key) as client:
        uploaded = upload_file(client, file, purpose="batch", threshold=threshold, part_size=part)
        note(f"uploaded {file} as {uploaded.id} ({uploaded.bytes} bytes)", json_out)
        batch = client.batches.create(
            input_file_id=uploaded.id,
            endpoint=endpoint,  # type: ignore[arg-type]
            completion_window=window,  # type: ignore[arg-type]
            metadata=meta,
        )
        note(f"created {batch.id}", json_out)
        if wait or download is not None:
            code = finish(
                client, batch, poll=poll, timeout=timeout, download=download, json_out=json_out
            )
        elif json_out:
            print_json(batch)
        else:
            echo(batch.id)
    raise typer.Exit(code)


@batches_app.command("list")
def list_batches(
    limit: Limit = 20,
    after: Annotated[
        str | None, typer.Option("--after", help="Start after this batch id.", show_default=False)
    ] = None,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    json_out: JsonOut = False,
) -> None:
    """List batches, newest first."""
    from openai import omit

    with connect(base_url, api_key) as client:
        found = first(client.batches.list(limit=min(limit, 100), after=after or omit), limit)
    if json_out:
        print_json(found)
        return
    table = Table("id", "status", "endpoint", "created", "done/total", "failed", box=None)
    for batch in found:
        done, failed, total = counts(batch)
        created = local_time(batch.created_at)
        table.add_row(
            batch.id, batch.status, batch.endpoint, created, f"{done}/{total}", str(failed)
        )
    print_table(table)


def show_batch(batch: Batch) -> None:
    """A batch's fields, one per line, for a person (times in local time)."""
    table = Table(box=None, show_header=False)
    for key, value in batch.model_dump(mode="json", exclude_none=True).items():
        if key.endswith("_at") and isinstance(value, int):
            value = local_time(value)
        elif isinstance(value, dict):
            value = " ".join(f"{k}={v}" for k, v in value.items())
        table.add_row(key, str(value))
    print_table(table)


@batches_app.command("get")
def get(
    batch_id: BatchId,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    json_out: JsonOut = False,
) -> None:
    """Show a batch."""
    with connect(base_url, api_key) as client:
        batch = client.batches.retrieve(batch_id)
    emit(batch, json_out, lambda: show_batch(batch))


@batches_app.command("cancel")
def cancel(
    batch_id: BatchId,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    json_out: JsonOut = False,
) -> None:
    """Cancel a batch (it goes cancelling, then cancelled; its finished lines are kept)."""
    with connect(base_url, api_key) as client:
        batch = client.batches.cancel(batch_id)
    emit(batch, json_out, lambda: echo(f"{batch.id} {batch.status}"))


@batches_app.command("wait")
def wait(
    batch_id: BatchId,
    poll: Poll = DEFAULT_POLL,
    timeout: Timeout = None,
    download: Download = None,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    json_out: JsonOut = False,
) -> None:
    """Follow a batch until it ends; the exit code says how (docs/client.md)."""
    with connect(base_url, api_key) as client:
        batch = client.batches.retrieve(batch_id)
        code = finish(
            client, batch, poll=poll, timeout=timeout, download=download, json_out=json_out
        )
    raise typer.Exit(code)


@batches_app.command("download")
def download(
    batch_id: BatchId,
    directory: Annotated[
        Path,
        typer.Argument(file_okay=False, help="Where to write the files (created if missing)."),
    ],
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    json_out: JsonOut = False,
) -> None:
    """Download a batch's output and error files as DIR/<batch_id>_output.jsonl and
    DIR/<batch_id>_error.jsonl."""
    with connect(base_url, api_key) as client:
        batch = client.batches.retrieve(batch_id)
        written = download_batch(client, batch, directory, json_out)
    if json_out:
        print_json(batch)
    else:
        for path in written:
            echo(str(path))
