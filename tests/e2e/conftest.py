"""Servers as real subprocesses (``python -m vllm_batch.cli serve``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import free_port


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def spawn_server(
    args: list[str],
    data_dir: Path,
    *,
    env: dict[str, str] | None = None,
    port: int | None = None,
    wait_engine: bool = True,
    timeout: float = 240,
) -> ServerProcess:
    """Start ``vllm-batch serve`` and wait until it answers (and its engine is loaded)."""
    port = port or free_port()
    log_path = data_dir / f"server-{port}.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    command = [
        sys.executable,
        "-m",
        "vllm_batch.cli",
        "serve",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        *args,
    ]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()[-4000:]}")
        try:
            ready = httpx.get(f"{server.url}/ready", timeout=2).json()
            if not wait_engine or ready["worker"].get("loaded_model"):
                return server
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            stop_server(server)
            raise TimeoutError(f"server not ready after {timeout}s:\n{server.log()[-4000:]}")
        time.sleep(0.5)


def stop_server(server: ServerProcess, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    """Send ``sig`` to the server (SIGKILL: to its whole process group) and wait for it."""
    if server.process.poll() is None:
        if sig == signal.SIGKILL:
            os.killpg(server.process.pid, sig)
        else:
            os.kill(server.process.pid, sig)
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(10)
    return server.process.returncode


def served(args: list[str], data_dir: Path, **kwargs: object) -> Iterator[ServerProcess]:
    server = spawn_server(args, data_dir, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        stop_server(server)
