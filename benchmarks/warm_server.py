"""A ``vllm-batch serve`` subprocess with its engine loaded and warmed, driven over HTTP.

Used by the benchmarks that time batches on a warm server (``bench_feed.py``): the engine
start-up is paid once, before anything is timed, and a small warm-up batch runs first so
that the first timed batch does not pay for the engine's first steps either.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from bench_batch import (
    PY,
    Child,
    EngineConfig,
    Variant,
    log,
    our_cli_help,
    our_engine_args,
    wait_ready,
)
from common import free_port, upload_batch_file

PY_MODULE = ["-m", "vllm_batch.cli", "serve"]
TERMINAL = ("completed", "failed", "cancelled", "expired")


@dataclass
class Submitted:
    """A batch created on the server, and when (client clock, seconds since the epoch)."""

    batch_id: str
    label: str
    lines: int
    upload_started: float
    created: float  # just before POST /v1/batches
    window: str = "24h"
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class Finished:
    """A batch seen in a final state by the poller."""

    submitted: Submitted
    status: str
    seen_at: float  # client clock, first poll that saw the final state
    info: dict[str, Any]

    @property
    def create_to_done_s(self) -> float:
        """From ``POST /v1/batches`` to the first poll that saw it final (poll <= 0.2 s)."""
        return self.seen_at - self.submitted.created


class WarmServer:
    """``vllm-batch serve`` with the in-process worker, started in ``__enter__``.

    ``extra_env`` is added to the server's environment (``VLLM_BATCH_CHUNK_SIZE`` ...);
    ``python_flags`` go to its interpreter (``-X dev``).
    """

    def __init__(
        self,
        engine: EngineConfig,
        workdir: Path,
        label: str,
        env: dict[str, str],
        extra_env: dict[str, str],
        timeout: float,
        warmup_file: Path | None = None,
        python_flags: tuple[str, ...] = (),
    ) -> None:
        self.engine = engine
        self.workdir = workdir
        self.label = label
        self.timeout = timeout
        self.warmup_file = warmup_file
        ours = our_engine_args(our_cli_help("serve") or "", engine, Variant.parse("server"))
        self.note = ours.note
        self.env = {
            **env,
            **ours.env,
            "VLLM_BATCH_MAX_REQUESTS_PER_BATCH": "100000",
            "VLLM_BATCH_MAX_UPLOAD_BYTES": str(1 * 2**30),
            **extra_env,
        }
        self.extra_env = extra_env
        self.port = free_port()
        self.data_dir = workdir / f"{label}.data"
        self.cmd = [PY, *python_flags, *PY_MODULE]
        self.cmd += ["--model", f"{engine.name}={engine.model}", "--port", str(self.port)]
        self.cmd += ["--data-dir", str(self.data_dir), *ours.flags]
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_s: float | None = None
        self.warmup_s: float | None = None
        self.child: Child | None = None
        self.client = httpx.Client(base_url=f"{self.url}/v1", timeout=600)

    def __enter__(self) -> WarmServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        shown = " ".join(f"{k}={v}" for k, v in self.extra_env.items())
        log(f"{self.label}: {shown} {' '.join(self.cmd)}".strip())
        self.child = Child(self.cmd, self.env, self.workdir / f"{self.label}.log")
        try:
            ready = wait_ready(self.child, self.url, self.engine.name, self.timeout)
            self.startup_s = ready - self.child.started
            log(f"{self.label}: engine loaded after {self.startup_s:.1f} s")
            if self.warmup_file is not None:
                t0 = time.time()
                done = self.wait([self.submit(self.warmup_file, "warm-up")])
                self.warmup_s = time.time() - t0
                status = done[0].status
                if status != "completed":
                    raise RuntimeError(f"warm-up batch ended {status}: {done[0].info}")
                log(f"{self.label}: warm-up batch done in {self.warmup_s:.1f} s")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        if self.child is not None:
            self.child.stop()

    def failure(self, what: str) -> RuntimeError:
        assert self.child is not None
        return self.child.failure(what)

    def submit(
        self,
        path: Path,
        label: str,
        window: str = "24h",
        metadata: dict[str, str] | None = None,
    ) -> Submitted:
        """Upload ``path`` and create a chat batch from it."""
        started = time.time()
        file_id = upload_batch_file(self.client, path)
        created = time.time()
        body: dict[str, Any] = {
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": window,
        }
        if metadata:
            body["metadata"] = metadata
        response = self.client.post("/batches", json=body)
        if response.status_code != 200:
            raise RuntimeError(
                f"POST /v1/batches refused ({response.status_code}): {response.text}"
            )
        with open(path, "rb") as handle:
            lines = sum(1 for line in handle if line.strip())
        return Submitted(
            response.json()["id"], label, lines, started, created, window, dict(metadata or {})
        )

    def states(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """The current batch objects for ``ids`` (one list call, then one call per stray)."""
        page = self.client.get("/batches", params={"limit": 100})
        page.raise_for_status()
        found = {b["id"]: b for b in page.json()["data"] if b["id"] in ids}
        for batch_id in ids:
            if batch_id not in found:
                found[batch_id] = self.client.get(f"/batches/{batch_id}").json()
        return found

    def wait(
        self, batches: list[Submitted], poll: float = 0.2, until_any: bool = False
    ) -> list[Finished]:
        """Poll until every batch (or, with ``until_any``, one) is final; in finishing order."""
        assert self.child is not None
        pending = {s.batch_id: s for s in batches}
        done: list[Finished] = []
        deadline = time.time() + self.timeout
        while pending and not (until_any and done):
            if self.child.proc.poll() is not None:
                raise self.failure("server exited")
            if time.time() > deadline:
                raise RuntimeError(f"batches not final after {self.timeout:.0f} s: {list(pending)}")
            now = time.time()
            for batch_id, info in self.states(list(pending)).items():
                if info["status"] in TERMINAL:
                    done.append(Finished(pending.pop(batch_id), info["status"], now, info))
            if pending:
                time.sleep(poll)
        return done

    def first_progress(self, batch: Submitted, min_completed: int = 1) -> float:
        """Wait until ``batch`` is in progress with ``min_completed`` requests done."""
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            info = self.client.get(f"/batches/{batch.batch_id}").json()
            counts = info.get("request_counts") or {}
            if info["status"] in TERMINAL:
                raise RuntimeError(f"{batch.label} ended {info['status']} before it was timed")
            if info["status"] == "in_progress" and (counts.get("completed") or 0) >= min_completed:
                return time.time()
            time.sleep(0.2)
        raise RuntimeError(f"{batch.label} made no progress in {self.timeout:.0f} s")

    def cancel(self, batch: Submitted) -> bool:
        """Ask to cancel ``batch``; False if the server refused (finalizing, say)."""
        response = self.client.post(f"/batches/{batch.batch_id}/cancel")
        if response.status_code != 200:
            log(f"cancel {batch.label}: {response.status_code} {response.text[:200]}")
        return response.status_code == 200

    def download(self, finished: Finished, path: Path) -> Path:
        """Write the batch's output file to ``path`` (empty if it has none)."""
        file_id = finished.info.get("output_file_id")
        with open(path, "wb") as out:
            if file_id:
                with self.client.stream("GET", f"/files/{file_id}/content") as stream:
                    stream.raise_for_status()
                    for chunk in stream.iter_bytes():
                        out.write(chunk)
        return path


def split_batch(source: Path, parts: int, out_dir: Path, stem: str) -> list[Path]:
    """Cut ``source`` into ``parts`` files of equal length (same lines, ids ``req-0..``)."""
    lines = source.read_text().splitlines()
    if len(lines) % parts:
        raise SystemExit(f"{len(lines)} lines do not split into {parts} equal batches")
    size = len(lines) // parts
    paths = []
    for k in range(parts):
        path = out_dir / f"{stem}-{k:02d}.jsonl"
        with open(path, "w") as out:
            for j, line in enumerate(lines[k * size : (k + 1) * size]):
                record = json.loads(line)
                record["custom_id"] = f"req-{j}"
                out.write(json.dumps(record) + "\n")
        paths.append(path)
    return paths
