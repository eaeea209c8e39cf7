"""``vllm-batch files``: upload, list, show, download and delete files on any
OpenAI-compatible API (exit codes: ``client_common``, docs/client.md)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from vllm_batch.cli.client_common import (
    DEFAULT_PART_SIZE,
    DEFAULT_UPLOAD_THRESHOLD,
    ApiKey,
    BaseUrl,
    JsonOut,
    Limit,
    PartSize,
    UploadThreshold,
    connect,
    download_file,
    echo,
    emit,
    first,
    local_time,
    note,
    print_table,
    upload_file,
    upload_sizes,
)

if TYPE_CHECKING:
    from openai.types import FileObject

files_app = typer.Typer(
    help="Upload, list, download and delete files on any OpenAI-compatible API.",
    no_args_is_help=True,
)

FileId = Annotated[str, typer.Argument(help="The file's id.", show_default=False)]


def file_table(files: list[FileObject]) -> Table:
    """Files as a table for a person."""
    table = Table("id", "purpose", "bytes", "created", "filename", box=None)
    for f in files:
        table.add_row(f.id, f.purpose, str(f.bytes), local_time(f.created_at), f.filename)
    return table


@files_app.command("upload")
def upload(
    file: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, readable=True, help="The file to upload."),
    ],
    purpose: Annotated[str, typer.Option("--purpose", help="The file's purpose.")] = "batch",
    upload_threshold: UploadThreshold = DEFAULT_UPLOAD_THRESHOLD,
    part_size: PartSize = DEFAULT_PART_SIZE,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    json_out: JsonOut = False,
) -> None:
    """Upload FILE (through the Uploads API from --upload-threshold up); prints its id."""
    threshold, part = upload_sizes(upload_threshold, part_size)
    with connect(base_url, api_key) as client:
        uploaded = upload_file(client, file, purpose=purpose, threshold=threshold, part_size=part)
    emit(uploaded, json_out, lambda: echo(uploaded.id))


@files_app.command("list")
def list_files(
    purpose: Annotated[
        str | None, typer.Option("--purpose", help="Only files of this purpose.")
    ] = None,
    limit: Limit = 20,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    json_out: JsonOut = False,
) -> None:
    """List files, newest first."""
    from openai import omit

    with connect(base_url, api_key) as client:
        found = first(client.files.list(limit=min(limit, 100), purpose=purpose or omit), limit)
    emit(found, json_out, lambda: print_table(file_table(found)))


@files_app.command("get")
def get(
    file_id: FileId,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    json_out: JsonOut = False,
) -> None:
    """Show a file."""
    with connect(base_url, api_key) as client:
        found = client.files.retrieve(file_id)
    emit(found, json_out, lambda: print_table(file_table([found])))


@files_app.command("download")
def download(
    file_id: FileId,
    path: Annotated[
        Path | None,
        typer.Argument(
            help="Where to write it (a directory: under the file's name; default: the "
            "file's name, here).",
            show_default=False,
        ),
    ] = None,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    json_out: JsonOut = False,
) -> None:
    """Download a file's content, streamed to disk."""
    with connect(base_url, api_key) as client:
        found = client.files.retrieve(file_id)
        name = Path(found.filename).name or f"{found.id}.jsonl"
        target = path or Path(name)
        if target.is_dir():
            target = target / name
        size = download_file(client, file_id, target)
    note(f"wrote {target} ({size} bytes)", json_out)
    emit(found, json_out, lambda: echo(str(target)))


@files_app.command("rm")
def rm(
    file_id: FileId,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    json_out: JsonOut = False,
) -> None:
    """Delete a file."""
    with connect(base_url, api_key) as client:
        deleted = client.files.delete(file_id)
    emit(deleted, json_out, lambda: echo(f"{deleted.id} deleted"))
