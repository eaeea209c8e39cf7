"""Multiprocess metrics: real processes record into one directory; a scrape sums them,
drops the live gauges of dead processes (killed or exited) and a fresh start wipes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.metrics_helpers import Scrape, parse
from vllm_batch.observability.exposition import render

RECORDER = """
import sys
from vllm_batch.config import Settings
from vllm_batch.observability import metrics
from vllm_batch.pipeline.line_result import LineResult

directory, lines = sys.argv[1], int(sys.argv[2])
metrics.configure(Settings(metrics_dir=directory, models=["m=/unused"]))
metrics.lines_saved("m", [
    LineResult(line=i, is_error=i == 0, data="", input_tokens=5, output_tokens=2, seconds=0.2)
    for i in range(lines)
])
metrics.engine_loaded("m")
print("recorded", flush=True)
sys.stdin.readline()  # live until stdin closes
"""


class Recorder:
    """A process that records ``lines`` saved lines and a loaded engine, then waits."""

    def __init__(self, directory: Path, lines: int) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        self.process = subprocess.Popen(
            [sys.executable, "-c", RECORDER, str(directory), str(lines)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline() == b"recorded\n"

    def exit(self) -> None:
        """A clean exit (its atexit hook runs)."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        assert self.process.wait(30) == 0

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)


@pytest.fixture
def recorders() -> Iterator[list[Recorder]]:
    started: list[Recorder] = []
    yield started
    for recorder in started:
        if recorder.process.poll() is None:
            recorder.kill()


def collect(directory: Path) -> Scrape:
    body, content_type = render(directory, [], None)
    assert content_type.startswith("text/plain")
    return parse(body.decode())


def test_processes_are_summed_and_dead_ones_leave_only_counters(
    tmp_path: Path, recorders: list[Recorder]
) -> None:
    directory = tmp_path / "metrics"
    started = time.monotonic()
    recorders += [Recorder(directory, 3), Recorder(directory, 4)]
    first, second = recorders
    both = collect(directory)
    assert both.get("vllm_batch_lines_completed_total", model="m") == 2 + 3
    assert both.get("vllm_batch_lines_failed_total", model="m") == 2
    assert both.get("vllm_batch_tokens_total", model="m", kind="input") == 5 * 7
    assert both.get("vllm_batch_request_latency_seconds_count", model="m") == 7
    assert both.get("vllm_batch_request_latency_seconds_bucket", model="m", le="0.25") == 7
    assert both.get("vllm_batch_engine_loaded", model="m") == 2
    assert both.get("vllm_batch_lines_per_second", model="m") > 0
    assert both.types["vllm_batch_lines_completed"] == "counter"
    assert both.types["vllm_batch_request_latency_seconds"] == "histogram"
    assert all(name.startswith("vllm_batch_") for name in both.names())

    first.kill()  # SIGKILL: no exit hook; the scrape itself reaps its live gauges
    killed = collect(directory)
    assert killed.get("vllm_batch_lines_completed_total", model="m") == 5
    assert killed.get("vllm_batch_request_latency_seconds_count", model="m") == 7
    assert killed.get("vllm_batch_engine_loaded", model="m") == 1

    # A new process while another one lives: nothing is wiped, counters keep adding up.
    recorders.append(Recorder(directory, 1))
    added = collect(directory)
    assert added.get("vllm_batch_lines_completed_total", model="m") == 5
    assert added.get("vllm_batch_lines_failed_total", model="m") == 3
    assert added.get("vllm_batch_request_latency_seconds_count", model="m") == 8
    assert added.get("vllm_batch_engine_loaded", model="m") == 2

    second.exit()
    recorders[-1].exit()
    gone = collect(directory)
    assert gone.get("vllm_batch_engine_loaded", model="m") == 0
    assert gone.get("vllm_batch_request_latency_seconds_count", model="m") == 8

    # The first process after all others are gone starts from zero.
    recorders.append(Recorder(directory, 2))
    fresh = collect(directory)
    assert fresh.get("vllm_batch_lines_completed_total", model="m") == 1
    assert fresh.get("vllm_batch_request_latency_seconds_count", model="m") == 2
    assert fresh.get("vllm_batch_engine_loaded", model="m") == 1
    print(f"processes test took {time.monotonic() - started:.1f}s")
