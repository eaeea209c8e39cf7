"""Servers as real subprocesses (``python -m vllm_batch.cli serve``), and a real Ray cluster."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.engine_budget import Slot, engine_slot_acquire, reap_group, track_group


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    slot: Slot | None = None
    """The engine-budget slot held while the process lives (none for an API-only server)."""

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
    cli: str = "vllm_batch.cli",
) -> ServerProcess:
    """Start ``vllm-batch serve`` and wait until it answers (and its engine is loaded).

    A server that runs a vLLM engine first takes a slot of the suite's engine budget."""
    port = port or free_port()
    log_path = data_dir / f"server-{port}.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    command = [
        sys.executable,
        "-m",
        cli,  # or tests.paced: the same command with the engine paced by a gate
        "serve",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        *args,
    ]
    slot = engine_slot_acquire(f"serve {port}") if runs_engine(args, full_env) else None
    try:
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
            )
        track_group(process.pid)
    except BaseException:
        if slot is not None:
            slot.release()
        raise
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path, slot)
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


def runs_engine(args: list[str], env: dict[str, str]) -> bool:
    """Whether ``vllm-batch serve ARGS`` (or ``worker``) starts a local vLLM engine."""
    if "--no-worker" in args or env.get("VLLM_BATCH_WORKER", "").lower() in ("0", "false"):
        return False
    engine = env.get("VLLM_BATCH_ENGINE", "vllm")
    if "--engine" in args:
        engine = args[args.index("--engine") + 1]
    return engine == "vllm"


def stop_server(server: ServerProcess, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    """Send ``sig`` to the server (SIGKILL: to its whole process group) and wait for it;
    then give back its engine slot."""
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
    reap_group(server.process.pid)
    if server.slot is not None:
        server.slot.release()
        server.slot = None
    return server.process.returncode


def served(args: list[str], data_dir: Path, **kwargs: object) -> Iterator[ServerProcess]:
    server = spawn_server(args, data_dir, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        stop_server(server)


# ------------------------------------------------------------------ a real Ray cluster

RAY_LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "token",
    "RAY_AUTH_TOKEN": secrets.token_hex(32),
}
"""Ray on 127.0.0.1 (its switch for one-machine clusters: it would pick, and rewrite
127.0.0.1 to, the machine's address), no usage reports, and token authentication as the
docs/scaling.md sets it up. Processes that join the test cluster need all of it (a driver finds its
node by IP, and must present the token). The switch also refuses a second node, so the
test cluster is one head node: joining nodes is left to the commands in docs/scaling.md."""
RAY_PORT_FLAGS = (
    "--ray-client-server-port",
    "--node-manager-port",
    "--object-manager-port",
    "--runtime-env-agent-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--metrics-export-port",
)
"""Every fixed port a head node opens besides ``--port``, each given a free one: two test
sessions' clusters (pytest-xdist workers) never meet."""


@dataclass
class Launched:
    """A command started in the background, its output going to ``log_path``."""

    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float = 300) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


class RayNode(Launched):
    """One ``ray start --block`` process (it runs the node's services and workers)."""

    def pids(self) -> set[int]:
        """This node's processes: its services and its Ray workers (actors among them)."""
        import psutil

        return {p.pid for p in psutil.Process(self.process.pid).children(recursive=True)}


@dataclass
class RayCluster:
    address: str
    head: RayNode


def start_ray_node(args: list[str], temp_dir: Path, name: str, timeout: float = 90) -> RayNode:
    """``ray start ARGS --block`` on loopback; returns once the node is up."""
    command = [str(Path(sys.executable).with_name("ray")), "start", *args, "--block"]
    command += ["--num-gpus=0", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    command += [f"{flag}={free_port()}" for flag in RAY_PORT_FLAGS]
    log_path = temp_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **RAY_LOCAL_ENV},
            start_new_session=True,
        )
    node = RayNode(process, log_path)
    deadline = time.monotonic() + timeout
    while "Ray runtime started" not in node.log():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_ray_node(node)
            raise RuntimeError(f"ray start failed:\n{node.log()[-4000:]}")
        time.sleep(0.3)
    return node


def stop_ray_node(node: RayNode) -> None:
    """SIGTERM to ``ray start --block`` (it stops the node), then SIGKILL to what is left."""
    node.stop()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.process.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    """A real Ray cluster, ``ray start --head`` with 2 CPUs on 127.0.0.1, once per session.
    Its temp dir has a short path: Ray's socket paths must fit in 107 bytes."""
    temp_dir = Path(tempfile.mkdtemp(prefix="vbray", dir="/tmp"))
    port = free_port()
    try:
        head = start_ray_node(["--head", f"--port={port}", "--num-cpus=2"], temp_dir, "head")
        try:
            yield RayCluster(f"127.0.0.1:{port}", head)
        finally:
            stop_ray_node(head)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_args(cluster: RayCluster) -> list[str]:
    """The flags that run a command's engine on ``cluster``: one replica of one CPU."""
    return ["--executor", "ray", "--ray-address", cluster.address, "--ray-replicas", "1"]
