"""A real vLLM OpenAI server on loopback (``python -m vllm.entrypoints.openai.api_server``;
the wheel's ``vllm`` console script is broken), for the remote engine's tests and
benchmarks. It can be killed (SIGKILL to its process group) and started again on its port.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.conftest import free_port
from tests.engine_budget import Slot, engine_slot_acquire, reap_group

CPU_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
"""No ``VLLM_CPU_KVCACHE_SPACE``: vLLM's CPU platform would apply it over
``--kv-cache-memory-bytes``."""
KV_CACHE_BYTES = 128 * 1024**2


@dataclass
class VllmUpstream:
    """``vllm serve`` for one model (float32, eager: CPU) on 127.0.0.1:``port``."""

    model: Path
    name: str
    log_dir: Path
    max_model_len: int = 512
    max_num_seqs: int = 64
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    slot: Slot | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"vllm-upstream-{self.port}.log"

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--served-model-name",
            self.name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-model-len",
            str(self.max_model_len),
            "--max-num-seqs",
            str(self.max_num_seqs),
            "--enable-prompt-tokens-details",
            "--disable-uvicorn-access-log",
            "--kv-cache-memory-bytes",
            str(KV_CACHE_BYTES),
        ]

    def start(self, timeout: float = 300) -> None:
        """Start the server and wait until ``/v1/models`` lists the model."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **CPU_ENV}
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        if self.slot is None:
            self.slot = engine_slot_acquire(f"vllm upstream {self.port}")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.process.returncode}:\n{self.log()}")
            try:
                listing = httpx.get(f"{self.url}/models", timeout=2).json()
                if any(m.get("id") == self.name for m in listing.get("data", [])):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"vLLM not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.5)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the server and its engine process (its whole process group)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
        self._give_back_slot()

    def _give_back_slot(self) -> None:
        if self.process is not None:
            reap_group(self.process.pid)
        if self.slot is not None:
            self.slot.release()
            self.slot = None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit within 30 s."""
        if self.process is None or self.process.poll() is not None:
            self._give_back_slot()
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
        self._give_back_slot()

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]
