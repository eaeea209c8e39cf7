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
    connect,
    download_file,
    echo,
    local_time,
    note,
    parse_size,
    print_json,
    print_table,
    upload_file,
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
    upload_threshold: Annotated[
        str,
        typer.Option(
            "--upload-threshold",
            help="Files this big or bigger go through the Uploads API, in parts.",
        ),
    ] = DEFAULT_UPLOAD_THRESHOLD,
    part_size: Annotated[
        str, typer.Option("--part-size", help="The Uploads API's part size.")
    ] = DEFAULT_PART_SIZE,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    json_out: JsonOut = False,
) -> None:
    """Upload FILE (through the Uploads API from --upload-threshold up); prints its id."""
    threshold, part = parse_size(upload_threshold), parse_size(part_size)
    if part < 1:
        raise typer.BadParameter("must be at least 1 byte", param_hint="--part-size")
    with connect(base_url, api_key) as client:
        uploaded = upload_file(client, file, purpose=purpose, threshold=threshold, part_size=part)
    if json_out:
        print_json(uploaded)
    else:
        echo(uploaded.id)


@files_app.command("list")
def list_files(
    purpose: Annotated[
        str | None, typer.Option("--purpose", help="Only files of this purpose.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many.")] = 20,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    json_out: JsonOut = False,
) -> None:
    """List files, newest first."""
    from openai import omit

    with connect(base_url, api_key) as client:
        page = client.files.list(limit=min(limit, 100), purpose=purpose or omit)
        found: list[FileObject] = []
        for f in page:
            found.append(f)
            if len(found) >= limit:
                break
    if json_out:
        print_json(found)
    else:
        print_table(file_table(found))


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
    if json_out:
        print_json(found)
    else:
        print_table(file_table([found]))


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
    if json_out:
        print_json(found)
    else:
        echo(str(target))


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
    if json_out:
        print_json(deleted)
    else:
        echo(f"{deleted.id} deleted")
