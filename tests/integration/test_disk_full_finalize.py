"""A batch whose output does not fit, on the real tiny engine: the data directory is a real
48 MiB tmpfs (the SQLite database and the metrics live elsewhere). The input is stored,
then a filler file takes all but 32 KiB, so the lines run (their results go to the
database) and only the output write fails: deterministic, no racing the clock.

While the disk is full the batch stays ``finalizing`` with a ``storage_full`` error on the
batch and on the dashboard, retries with backoff without leaving attempt folders, and
``/ready`` is 503 naming storage. Once the filler is deleted the batch completes with
every line exactly once and the error cleared."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.conftest import TINY_NAME, LiveServer, LoopThread, engine_settings, start_server
from tests.helpers import chat_line, jsonl, parse_jsonl, wait_for_batch
from tests.metrics_helpers import scrape
from tests.tmpfs import fill, small_tmpfs

LINES = 120
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with small_tmpfs(tmp_path_factory.mktemp("disk"), "48m") as mount:
        yield mount


@pytest.fixture(scope="module")
def live(
    loop_thread: LoopThread,
    tiny_engine: Any,
    tiny_model: Path,
    disk: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    elsewhere = tmp_path_factory.mktemp("not-on-the-tmpfs")
    settings = engine_settings(
        tiny_model,
        database_url=f"sqlite+aiosqlite:///{elsewhere / 'db.sqlite'}",
        metrics_dir=elsewhere / "metrics",
        data_dir=disk / "data",
        chunk_size=40,
        storage_min_free_bytes=MIB,
        finalize_retry_max_seconds=2.0,
    )
    yield from start_server(loop_thread, settings, tiny_engine)


def poll(what: str, check: Any, timeout: float) -> Any:
    """``check()`` until it returns something truthy; fails naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.1)


def storage_error(client: OpenAI, batch_id: str, attempt: int) -> Any:
    """The batch once its ``errors`` report attempt ``attempt`` (or a later one) failing."""
    batch = client.batches.retrieve(batch_id)
    data = batch.errors.data if batch.errors and batch.errors.data else []
    if data and data[0].code == "storage_full":
        seen = int(str(data[0].message).split("(attempt ", 1)[1].split(")", 1)[0])
        return batch if seen >= attempt else None
    return None


def quiet_attempt_folders(live: LiveServer, batch_id: str, root: Path) -> list[str]:
    """What lies under ``batches/<id>`` at a moment when no attempt runs: read between two
    looks at the in-process finalizer, which must show no attempt running and the same
    attempt count (an attempt that started and ended in between would have bumped it)."""
    ctx = live.app.state.ctx

    def look() -> list[str] | None:
        before = ctx.finalize_backoff.get(batch_id)
        if batch_id in ctx.finalizing:
            return None
        found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
        if batch_id in ctx.finalizing or ctx.finalize_backoff.get(batch_id) != before:
            return None
        return found or ["(nothing)"]

    return [name for name in poll("a moment between attempts", look, 30) if name != "(nothing)"]


def test_batch_waits_on_a_full_disk_and_completes_once_freed(live: LiveServer, disk: Path) -> None:
    root = disk / "data" / "batches"
    with OpenAI(base_url=live.base_url, api_key="unused", max_retries=0) as client:
        lines = [chat_line(i, TINY_NAME, max_tokens=8) for i in range(LINES)]
        upload = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        filler = fill(disk, leave=32 * 1024)  # the output (about 100 KB) cannot fit
        try:
            batch = client.batches.create(
                input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            failed = poll(
                "the batch to report storage_full", lambda: storage_error(client, batch.id, 1), 120
            )
            assert failed.status == "finalizing" and failed.output_file_id is None
            assert failed.request_counts.completed == LINES
            error = failed.errors.data[0]
            assert error.line is None and error.message.startswith(
                f"The file storage (local directory {disk / 'data'}) is full: "
                "No space left on device (ENOSPC). The output files could not be written"
            )

            # It retries with backoff, and no attempt leaves a folder behind.
            poll("a second attempt", lambda: storage_error(client, batch.id, 2), 30)
            assert quiet_attempt_folders(live, batch.id, root) == []

            response = httpx.get(f"{live.url}/ready", timeout=30)
            assert response.status_code == 503, response.text
            reason = response.json()["reasons"]["storage"]
            assert "file storage is almost full" in reason and "a write was refused" in reason
            dashboard = httpx.get(f"{live.base_url}/dashboard/batches/{batch.id}").json()
            assert dashboard["first_errors"][0]["code"] == "storage_full"
            metrics = scrape(f"{live.url}/metrics")
            assert metrics.get("vllm_batch_storage_ok") == 0
            assert metrics.get("vllm_batch_finalize_storage_retries_total") >= 2
        finally:
            filler.unlink()

        done = wait_for_batch(client, batch.id, timeout=30)
        assert done.status == "completed" and done.errors is None, done
        assert done.request_counts.completed == LINES and done.error_file_id is None
        output = parse_jsonl(client.files.content(done.output_file_id).text)
        counts = Counter(line["custom_id"] for line in output)
        assert counts == Counter(f"request-{i}" for i in range(LINES))  # each exactly once
        assert all(line["response"]["status_code"] == 200 for line in output)

    attempt = sorted(p.name for p in (root / batch.id).iterdir())
    assert len(attempt) == 1, attempt
    assert quiet_attempt_folders(live, batch.id, root) == [
        batch.id,
        f"{batch.id}/{attempt[0]}",
        f"{batch.id}/{attempt[0]}/output.jsonl",
    ]
    dashboard = httpx.get(f"{live.base_url}/dashboard/batches/{batch.id}").json()
    assert dashboard["errors"] is None and dashboard["first_errors"] == []
    poll("/ready to be 200", lambda: httpx.get(f"{live.url}/ready").status_code == 200, 10)
