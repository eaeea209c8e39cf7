"""SIGTERM while the engine is still loading stops ``serve`` and ``worker`` within seconds.

Before issue 19 the signal took effect only once the load had ended (about 30 s): the
worker's shutdown waited for the engine manager's lock, which the load held. Now shutdown
cancels the load: the engine processes it launched are terminated and the process exits 0,
leaving no engine process behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.conftest import PRODUCT_TOPOLOGY, TINY_NAME
from tests.e2e.conftest import spawn_server, stop_server
from tests.engine_budget import budgeted_popen

LOAD_STARTED = "starting vLLM engine for"
LOADED = "vLLM engine ready for"
EXIT_WITHIN = 15.0


def wait_for_engine_process(pid: int, log_path: Path, timeout: float = 120) -> list[int]:
    """Wait until the engine load has started and launched a child; return the children."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = log_path.read_text(errors="replace")
        assert LOADED not in log, "the engine finished loading before the test could stop it"
        if LOAD_STARTED in log:
            children = psutil.Process(pid).children(recursive=True)
            if children:
                return [child.pid for child in children]
        time.sleep(0.1)
    raise AssertionError(f"no engine process after {timeout} s:\n{log_path.read_text()[-3000:]}")


def assert_gone(pids: list[int], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    alive = pids
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if psutil.pid_exists(pid) and not _zombie(pid)]
        if not alive:
            return
        time.sleep(0.2)
    raise AssertionError(f"engine processes left behind: {alive}")


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def terminate_and_time(
    process: subprocess.Popen[bytes], log_path: Path, codes: tuple[int, ...] = (0,)
) -> float:
    """SIGTERM ``process``; seconds until it exited (with one of ``codes``)."""
    started = time.monotonic()
    os.kill(process.pid, signal.SIGTERM)
    try:
        code = process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        log = log_path.read_text()[-3000:]
        raise AssertionError(f"no exit 60 s after SIGTERM:\n{log}") from None
    elapsed = time.monotonic() - started
    assert code in codes, f"exit code {code}:\n{log_path.read_text()[-3000:]}"
    return elapsed


def test_serve_stops_promptly_on_sigterm_while_its_engine_loads(
    tiny_model: Path, tmp_path: Path
) -> None:
    server = spawn_server(
        ["--model", f"{TINY_NAME}={tiny_model}", "--max-model-len", "512"],
        tmp_path / "data",
        env=PRODUCT_TOPOLOGY,  # vLLM's CPU default: its worker process must go too
        wait_engine=False,
    )
    try:
        children = wait_for_engine_process(server.process.pid, server.log_path)
        # uvicorn re-raises the SIGTERM it handled once shut down (-15, "143" in a shell),
        # as the other SIGTERM tests accept; a clean shutdown is checked in the log below.
        elapsed = terminate_and_time(server.process, server.log_path, (0, -signal.SIGTERM))
    finally:
        stop_server(server, signal.SIGKILL)
    assert elapsed < EXIT_WITHIN, f"took {elapsed:.1f} s to exit:\n{server.log()[-3000:]}"
    assert_gone(children)
    log = server.log()
    assert "Application shutdown complete." in log, log[-3000:]
    assert LOADED not in log and "loading tiny-llama stopped: the process is shutting down" in log


def test_worker_stops_promptly_on_sigterm_while_its_engine_loads(
    tiny_model: Path, tmp_path: Path
) -> None:
    log_path = tmp_path / "worker.log"
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'worker.db'}"
    args = ["--model", f"{TINY_NAME}={tiny_model}", "--max-model-len", "512"]
    with open(log_path, "ab") as log:
        worker = budgeted_popen(
            "worker stopped while loading",
            [sys.executable, "-m", "vllm_batch.cli", "worker", *args, "--database-url", db_url],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **PRODUCT_TOPOLOGY, "VLLM_BATCH_DATA_DIR": str(tmp_path / "data")},
        )
    try:
        children = wait_for_engine_process(worker.pid, log_path)
        elapsed = terminate_and_time(worker, log_path)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)
    log = log_path.read_text(errors="replace")
    assert elapsed < EXIT_WITHIN, f"took {elapsed:.1f} s:\n{log[-3000:]}"
    assert_gone(children)
    assert LOADED not in log and "loading tiny-llama stopped: the process is shutting down" in log
