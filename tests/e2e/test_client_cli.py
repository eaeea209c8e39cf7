"""``vllm-batch batches`` and ``vllm-batch files`` (the batch client, docs/client.md) as real
subprocesses against live servers: a batch submitted, followed and downloaded; each
terminal status's exit code; usage, API and connection errors as one line; the Uploads API
from ``--upload-threshold`` up, with a real 300 MB file.

SQLite only: the client sees the HTTP API, whose database paths run on both backends
elsewhere. The engine-less server (``api``) holds batches that never run: waiting on them
times out, and cancelling or expiring them ends them without racing an engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession
from typer.testing import CliRunner

from tests.conftest import TINY_NAME, LiveServer, LoopThread, api_only_server, database, free_port
from tests.helpers import chat_line, jsonl, parse_jsonl, wait_for_batch
from vllm_batch.batches.store.rows import BatchRow, UploadRow
from vllm_batch.cli import app
from vllm_batch.cli.client_common import (
    EXIT_API_ERROR,
    EXIT_CANCELLED,
    EXIT_EXPIRED,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    parse_size,
)

BIG_BYTES = 300_000_000
BIG_LINE_BYTES = 7_500
"""40,000 lines of 7,500 bytes: 300 MB within the server's 50,000 lines per batch."""


@pytest.fixture(scope="module")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SQLite only (see the module's docstring)."""
    with database("sqlite", tmp_path_factory.mktemp("db") / "test.db") as url:
        yield url


@pytest.fixture(scope="module")
def api(
    loop_thread: LoopThread, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server without a worker, on a database of its own: its batches never run."""
    with database("sqlite", tmp_path_factory.mktemp("db") / "api.db") as url:
        yield from api_only_server(loop_thread, tiny_model, url, tmp_path_factory)


@pytest.fixture(scope="module")
def api_client(api: LiveServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=api.base_url, api_key="unused", max_retries=0) as sdk:
        yield sdk


def cli(base_url: str, *args: str | Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``python -m vllm_batch.cli ARGS`` with ``OPENAI_BASE_URL`` set to ``base_url``."""
    env = {**os.environ, "OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "unused"}
    return subprocess.run(
        [sys.executable, "-m", "vllm_batch.cli", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def in_process(base_url: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """``cli`` run in this process (typer's runner): no interpreter to start, for the
    commands whose exit codes the subprocess tests do not already cover."""
    env = {"OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "unused"}
    argv = [*map(str, args)]
    result = CliRunner().invoke(app, argv, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(argv, result.exit_code, result.stdout, result.stderr)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one ``error: …`` line a failed command prints last on stderr (no traceback)."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in result.stderr, result.stderr
    return errors[0]


def write(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_bytes(jsonl(lines))
    return path


def upload_of(server: LiveServer, file_id: str) -> Any:
    """The Uploads API's record of the upload that became ``file_id`` (None if none did)."""

    async def find(session: AsyncSession) -> Any:
        rows = await session.execute(select(UploadRow).where(UploadRow.file_id == file_id))
        return rows.scalar_one_or_none()

    return server.db(find)


def test_submit_wait_download(server: LiveServer, client: OpenAI, tmp_path: Path) -> None:
    lines = [chat_line(i, TINY_NAME) for i in range(6)]
    lines[3] = chat_line(3, TINY_NAME, temperature=-3)  # the engine refuses it: an error line
    source = write(tmp_path / "in.jsonl", lines)
    out = tmp_path / "results"
    args: list[str | Path] = ["--wait", "--poll", "0.2", "--download", out]
    args += ["--metadata", "team=a", "--json"]
    result = cli(server.base_url, "batches", "submit", source, *args)
    assert result.returncode == EXIT_OK, result.stderr
    batch = json.loads(result.stdout)  # stdout is the batch alone
    assert batch["status"] == "completed" and batch["metadata"] == {"team": "a"}
    assert batch["request_counts"] == {"total": 6, "completed": 5, "failed": 1}
    outputs = parse_jsonl((out / f"{batch['id']}_output.jsonl").read_text())
    errors = parse_jsonl((out / f"{batch['id']}_error.jsonl").read_text())
    assert [o["custom_id"] for o in outputs] == [f"request-{i}" for i in (0, 1, 2, 4, 5)]
    assert all(o["response"]["status_code"] == 200 for o in outputs)
    assert [e["custom_id"] for e in errors] == ["request-3"]
    assert errors[0]["response"]["status_code"] == 400
    assert sorted(p.name for p in out.iterdir()) == [
        f"{batch['id']}_error.jsonl",
        f"{batch['id']}_output.jsonl",
    ]
    assert client.files.retrieve(batch["input_file_id"]).bytes == source.stat().st_size
    assert upload_of(server, batch["input_file_id"]) is None  # below the threshold: files.create

    # the same batch through get, list, wait and download, for a person
    shown = in_process(server.base_url, "batches", "get", batch["id"])
    assert shown.returncode == EXIT_OK and "completed" in shown.stdout
    listed = in_process(server.base_url, "batches", "list", "--limit", "5", "--json")
    assert batch["id"] in [b["id"] for b in json.loads(listed.stdout)]
    waited = in_process(server.base_url, "batches", "wait", batch["id"])
    assert waited.returncode == EXIT_OK
    assert waited.stdout.startswith(f"{batch['id']} completed: 6/6 lines, 1 failed")
    again = in_process(server.base_url, "batches", "download", batch["id"], tmp_path / "again")
    assert again.returncode == EXIT_OK, again.stderr
    assert (tmp_path / "again" / f"{batch['id']}_output.jsonl").read_bytes() == (
        out / f"{batch['id']}_output.jsonl"
    ).read_bytes()


def test_a_batch_failed_at_validation_exits_3(server: LiveServer, tmp_path: Path) -> None:
    lines = [{**chat_line(i, TINY_NAME), "url": "/v1/nowhere"} for i in range(3)]
    source = write(tmp_path / "bad.jsonl", lines)
    result = cli(server.base_url, "batches", "submit", source, "--wait", "--poll", "0.2")
    assert result.returncode == EXIT_FAILED == 3, result.stderr
    assert " failed: " in result.stdout and "invalid_url (line 1)" in result.stdout


def test_cancelled_and_timed_out_batches(api: LiveServer, tmp_path: Path) -> None:
    source = write(tmp_path / "in.jsonl", [chat_line(i, TINY_NAME) for i in range(3)])
    created = cli(api.base_url, "batches", "submit", source)
    assert created.returncode == EXIT_OK, created.stderr
    batch_id = created.stdout.strip()
    timed_out = cli(api.base_url, "batches", "wait", batch_id, "--timeout", "0.5", "--poll", "0.1")
    assert timed_out.returncode == EXIT_TIMEOUT == 6, timed_out.stderr
    assert one_error_line(timed_out).startswith("error: timed out after 0.5s")
    cancelled = cli(api.base_url, "batches", "cancel", batch_id, "--json")
    assert cancelled.returncode == EXIT_OK, cancelled.stderr
    assert json.loads(cancelled.stdout)["status"] in ("cancelling", "cancelled")
    waited = cli(api.base_url, "batches", "wait", batch_id, "--poll", "0.2", "--json")
    assert waited.returncode == EXIT_CANCELLED == 5, waited.stderr
    assert json.loads(waited.stdout)["status"] == "cancelled"


def test_an_expired_batch_exits_4(api: LiveServer, api_client: OpenAI, tmp_path: Path) -> None:
    source = write(tmp_path / "in.jsonl", [chat_line(0, TINY_NAME)])
    created = cli(api.base_url, "batches", "submit", source, "--json")
    batch_id = json.loads(created.stdout)["id"]
    wait_for_batch(api_client, batch_id, statuses={"in_progress"}, timeout=60)

    async def overdue(session: AsyncSession) -> None:  # 24h is too long to wait for
        async with session.begin():
            await session.execute(
                update(BatchRow).where(BatchRow.id == batch_id).values(expires_at=1)
            )

    api.db(overdue)
    waited = cli(api.base_url, "batches", "wait", batch_id, "--poll", "0.2")
    assert waited.returncode == EXIT_EXPIRED == 4, waited.stderr
    assert f"{batch_id} expired: 1/1 lines, 1 failed" in waited.stdout


def test_files_commands_and_the_uploads_api(server: LiveServer, tmp_path: Path) -> None:
    source = write(tmp_path / "in.jsonl", [chat_line(i, TINY_NAME) for i in range(20)])
    args = ["--upload-threshold", "1", "--part-size", "300", "--json"]
    uploaded = in_process(server.base_url, "files", "upload", source, *args)
    assert uploaded.returncode == EXIT_OK, uploaded.stderr
    file = json.loads(uploaded.stdout)
    assert file["bytes"] == source.stat().st_size and file["purpose"] == "batch"
    assert upload_of(server, file["id"]).status == "completed"  # it went in parts
    got = in_process(server.base_url, "files", "get", file["id"], "--json")
    assert json.loads(got.stdout)["id"] == file["id"]
    listed = in_process(server.base_url, "files", "list", "--purpose", "batch", "--json")
    assert file["id"] in [f["id"] for f in json.loads(listed.stdout)]
    target = tmp_path / "copy.jsonl"
    fetched = in_process(server.base_url, "files", "download", file["id"], target)
    assert fetched.returncode == EXIT_OK, fetched.stderr
    assert target.read_bytes() == source.read_bytes()
    removed = in_process(server.base_url, "files", "rm", file["id"], "--json")
    assert json.loads(removed.stdout)["deleted"] is True
    gone = in_process(server.base_url, "files", "get", file["id"])
    assert gone.returncode == EXIT_API_ERROR == 1
    assert one_error_line(gone).startswith("error: 404 ")


def test_usage_api_and_connection_errors(server: LiveServer, tmp_path: Path) -> None:
    missing = cli(server.base_url, "batches", "submit", tmp_path / "missing.jsonl")
    assert missing.returncode == EXIT_USAGE == 2
    source = write(tmp_path / "in.jsonl", [chat_line(0, TINY_NAME)])
    bad_meta = cli(server.base_url, "batches", "submit", source, "--metadata", "no-equals")
    assert bad_meta.returncode == EXIT_USAGE
    unknown = in_process(server.base_url, "batches", "get", "batch_nope")
    assert unknown.returncode == EXIT_API_ERROR
    assert one_error_line(unknown) == "error: 404 not_found: No such batch: 'batch_nope'."
    nobody = f"http://127.0.0.1:{free_port()}/v1"
    unreachable = cli(nobody, "batches", "list")
    assert unreachable.returncode == EXIT_API_ERROR
    assert one_error_line(unreachable).startswith(f"error: cannot reach {nobody}/batches")


def test_sizes() -> None:
    assert parse_size("100MB") == 100_000_000 and parse_size("64MiB") == 64 * 2**20
    assert parse_size("1") == 1 and parse_size("1.5k") == 1500


def big_file(path: Path) -> Path:
    """``BIG_BYTES`` of valid chat lines, each padded to ``BIG_LINE_BYTES``."""
    line = chat_line(0, TINY_NAME)
    message = line["body"]["messages"][0]
    with path.open("wb") as out:
        for i in range(BIG_BYTES // BIG_LINE_BYTES):
            line["custom_id"], message["content"] = f"request-{i}", ""
            bare = len(json.dumps(line)) + 1  # ASCII: characters are bytes
            message["content"] = "x" * (BIG_LINE_BYTES - bare)
            out.write(json.dumps(line).encode() + b"\n")
    assert path.stat().st_size == BIG_BYTES
    return path


def test_a_300_mb_file_goes_through_the_uploads_api(
    api: LiveServer, api_client: OpenAI, tmp_path: Path
) -> None:
    source = big_file(tmp_path / "big.jsonl")
    started = time.monotonic()
    created = cli(api.base_url, "batches", "submit", source, "--json", timeout=300)
    assert created.returncode == EXIT_OK, created.stderr
    batch = json.loads(created.stdout)
    seconds = time.monotonic() - started
    print(f"300 MB uploaded and submitted in {seconds:.1f}s")
    assert api_client.files.retrieve(batch["input_file_id"]).bytes == BIG_BYTES
    upload = upload_of(api, batch["input_file_id"])
    assert upload is not None and upload.bytes == BIG_BYTES
    cancelled = cli(api.base_url, "batches", "cancel", batch["id"])
    assert cancelled.returncode == EXIT_OK, cancelled.stderr
