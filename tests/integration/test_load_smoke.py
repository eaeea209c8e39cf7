"""The Locust load file (``benchmarks/load/locustfile.py``) runs: 5 users for 15 s against
an in-process server on the shared tiny engine complete batches without a 5xx or a
connection error. The full 40-user benchmark is ``benchmarks/load/bench_load.py``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY_NAME, LiveServer, LoopThread, engine_settings, start_server

LOCUSTFILE = Path(__file__).resolve().parents[2] / "benchmarks" / "load" / "locustfile.py"
KEYS = ["sk-smoke-0", "sk-smoke-1"]


@pytest.fixture(scope="module")
def smoke_server(
    loop_thread: LoopThread,
    tiny_engine: Any,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    data = tmp_path_factory.mktemp("data")
    settings = engine_settings(
        tiny_model,
        database_url=f"sqlite+aiosqlite:///{data / 'db.sqlite'}",
        data_dir=data,
        api_keys=[f"smoke-{n}:{key}" for n, key in enumerate(KEYS)],
    )
    yield from start_server(loop_thread, settings, tiny_engine)


def test_locustfile_runs_clean(smoke_server: LiveServer, tmp_path: Path) -> None:
    # Locust is a subprocess: importing it here would gevent-patch the test process.
    summary = tmp_path / "summary.json"
    env = {
        **os.environ,
        "LOAD_API_KEYS": ",".join(KEYS),
        "LOAD_MODEL": TINY_NAME,
        "LOAD_SUMMARY": str(summary),
    }
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"]
    command += ["-u", "5", "-r", "5", "-t", "15s", "--host", smoke_server.url]
    command += ["--csv", str(tmp_path / "smoke"), "--only-summary"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    counts = json.loads(summary.read_text())
    assert counts.get("5xx", 0) == 0 and counts.get("connection_errors", 0) == 0, counts
    assert counts.get("batches_completed", 0) >= 5, counts
    with open(tmp_path / "smoke_stats.csv") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    for name in (
        "POST /v1/files",
        "POST /v1/batches",
        "GET /v1/batches/{id}",
        "GET /v1/files/{id}/content",
    ):
        assert int(rows[name]["Request Count"]) > 0, (name, rows.keys())
        assert int(rows[name]["Failure Count"]) == 0, rows[name]
