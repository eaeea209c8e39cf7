"""``vllm-batch run`` as a subprocess on the tiny model: the drop-in for ``vllm run-batch``.

Engine starts are expensive (25-60 s here, mostly imports), so three runs carry every engine
check: a reference run (URL input, URL output that fails twice, progress logs), a run killed
with SIGKILL part way (started alongside the reference run, which it does not depend on),
and its ``--resume``. Failures that must happen before any engine starts are fast runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY_NAME
from tests.engine_budget import budgeted_popen, budgeted_run
from tests.paced import PACED_CLI, Gate
from tests.unit.test_offline_io import FileServer

ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
ENGINE_FLAGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "512"]
COUNT = 60
UNKNOWN_MODEL, BAD_URL = 3, 5
FAST_SECONDS = 20  # a run that fails before the engine: interpreter start-up only


def chat_line(i: int, model: str = TINY_NAME, url: str = "/v1/chat/completions") -> str:
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": f"Question number {i}?"},
        ],
        "max_tokens": 24,
        "temperature": 0,
    }
    return json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body})


def input_text() -> str:
    lines = []
    for i in range(COUNT):
        if i == UNKNOWN_MODEL:
            lines.append(chat_line(i, model="no-such-model"))
        elif i == BAD_URL:
            lines.append(chat_line(i, url="/v1/embeddings"))
        else:
            lines.append(chat_line(i))
        if i == 10:
            lines.append("")  # blank lines are not requests
    return "\n".join(lines) + "\n"


def command(tiny_model: Path, inp: str, out: str, *extra: str) -> list[str]:
    model = f"{TINY_NAME}={tiny_model}"
    args = ["run", "-i", inp, "-o", out, "--model", model, *ENGINE_FLAGS, *extra]
    return [sys.executable, "-m", "vllm_batch.cli", *args]


def run_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return budgeted_run("run", args, env=ENV, capture_output=True, text=True, timeout=timeout)


def parse(data: str | bytes) -> list[dict[str, Any]]:
    text = data.decode() if isinstance(data, bytes) else data
    return [json.loads(line) for line in text.splitlines()]


def comparable(line: dict[str, Any]) -> tuple[Any, ...]:
    """What must match between runs: id, status and generated choices (not ids/timestamps)."""
    response = line["response"] or {}
    body = response.get("body") or {}
    return line["custom_id"], response.get("status_code"), body.get("choices"), line["error"]


@dataclass
class Reference:
    result: subprocess.CompletedProcess[str]
    output: bytes
    put_attempts: int
    spool: Path
    seconds: float


@pytest.fixture(scope="module")
def input_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("run") / "input.jsonl"
    path.write_text(input_text())
    return path


@dataclass
class KilledRun:
    output: Path
    log: Path
    process: subprocess.Popen[bytes]
    watcher: threading.Thread

    @property
    def partial(self) -> Path:
        return self.output.with_name(self.output.name + ".partial")

    def wait(self) -> int:
        """Lines the run had written when it was killed (after checking it was killed)."""
        self.watcher.join(300)
        assert self.process.returncode == -signal.SIGKILL, self.log.read_text()[-3000:]
        assert not self.output.exists()  # an unfinished run's output is only ever .partial
        return self.partial.read_bytes().count(b"\n")


@pytest.fixture(scope="module")
def killed_run(
    tiny_model: Path, input_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KilledRun]:
    """A local run SIGKILLed (with its engine processes) once it has written 8 lines."""
    out = tmp_path_factory.mktemp("killed") / "output.jsonl"
    partial = out.with_name(out.name + ".partial")
    log_path = out.with_suffix(".log")
    # The gate lets the engine start 12 requests: the run cannot end before it is killed.
    gate = Gate(out.with_name("gate"))
    gate.allow(12)
    args = command(tiny_model, str(input_file), str(out), "--max-num-seqs", "1")
    args[args.index("vllm_batch.cli")] = PACED_CLI
    with log_path.open("wb") as log:
        process = budgeted_popen(
            "run killed", args, env={**ENV, **gate.env}, stdout=log, stderr=subprocess.STDOUT
        )

    def lines_written() -> int:
        try:
            return partial.read_bytes().count(b"\n")
        except OSError:  # not created yet (or renamed away at the very end)
            return 0

    def kill_after_eight_lines() -> None:
        deadline = time.monotonic() + 280
        while time.monotonic() < deadline and process.poll() is None:
            if lines_written() >= 8:
                break
            time.sleep(0.05)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)

    watcher = threading.Thread(target=kill_after_eight_lines, daemon=True)
    watcher.start()
    yield KilledRun(out, log_path, process, watcher)
    if process.poll() is None:  # a test failed before waiting for it
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)


@pytest.fixture(scope="module")
def reference(
    tiny_model: Path,
    input_file: Path,
    killed_run: KilledRun,
    tmp_path_factory: pytest.TempPathFactory,
) -> Reference:
    """URL input, URL output whose first two PUTs fail, progress logged every second.

    Runs while ``killed_run`` does (engine start-up mostly waits, so the two overlap well).
    """
    spool = tmp_path_factory.mktemp("spool")
    with FileServer({"/input.jsonl": input_file.read_bytes()}, fail_puts=2) as server:
        started = time.monotonic()
        result = run_cli(
            command(
                tiny_model,
                f"{server.url}/input.jsonl",
                f"{server.url}/upload/output.jsonl",
                "--output-tmp-dir",
                str(spool),
                "--progress-interval",
                "1",
            )
        )
        seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-4000:]
    return Reference(
        result,
        server.received.get("/upload/output.jsonl", b""),
        server.put_attempts,
        spool,
        seconds,
    )


def test_round_trip_through_urls(reference: Reference) -> None:
    from vllm.entrypoints.launchers.run_batch import BatchRequestOutput

    lines = parse(reference.output)
    assert [line["custom_id"] for line in lines] == [f"req-{i}" for i in range(COUNT)]
    for raw in reference.output.decode().splitlines():
        BatchRequestOutput.model_validate_json(raw)
    ok = [line for i, line in enumerate(lines) if i not in (UNKNOWN_MODEL, BAD_URL)]
    assert all(line["response"]["status_code"] == 200 and line["error"] is None for line in ok)
    assert all(line["response"]["body"]["choices"][0]["message"]["content"] for line in ok)
    unknown, bad_url = lines[UNKNOWN_MODEL], lines[BAD_URL]
    assert unknown["response"]["status_code"] == 404 and unknown["response"]["body"] is None
    # vLLM's shape: the ErrorResponse under "error", its code the HTTP status.
    assert unknown["error"]["error"]["code"] == 404
    assert unknown["error"]["error"]["type"] == "NotFoundError"
    assert "`no-such-model` does not exist" in unknown["error"]["error"]["message"]
    assert bad_url["response"]["status_code"] == 400 and "/v1/embeddings" in str(bad_url["error"])
    # Uploaded after two failed PUTs; temporary files are gone.
    assert reference.put_attempts == 3 and list(reference.spool.iterdir()) == []
    assert reference.result.stderr.count("failed (attempt") == 2


def test_progress_is_logged_when_not_a_tty(reference: Reference) -> None:
    progress = [line for line in reference.result.stderr.splitlines() if "progress: " in line]
    assert progress, reference.result.stderr[-3000:]
    final = progress[-1]
    assert f"{COUNT}/{COUNT} done (100.0%)" in final
    assert "req/s" in final and "tok/s" in final and "2 errors" in final


def test_resume_after_sigkill(
    tiny_model: Path, input_file: Path, reference: Reference, killed_run: KilledRun
) -> None:
    done_before = killed_run.wait()
    assert 8 <= done_before < COUNT
    out = killed_run.output
    with FileServer({"/input.jsonl": input_file.read_bytes()}) as server:
        result = run_cli(command(tiny_model, f"{server.url}/input.jsonl", str(out), "--resume"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"resuming: {done_before} of {COUNT} requests" in result.stderr
    resumed = parse(out.read_text())
    expected = parse(reference.output)
    assert [line["custom_id"] for line in resumed] == [f"req-{i}" for i in range(COUNT)]
    # Greedy decoding on the tiny model is stable across batch compositions on CPU float32.
    assert [comparable(line) for line in resumed] == [comparable(line) for line in expected]


def _fails_fast(result: subprocess.CompletedProcess[str], seconds: float, code: int) -> None:
    assert result.returncode == code, result.stderr[-3000:]
    assert seconds < FAST_SECONDS
    assert "starting vLLM engine" not in result.stderr


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "line 3: not valid JSON"),
        ('{"method": "POST", "url": "/v1/chat/completions", "body": {}}', "line 3: missing"),
    ],
)
def test_structural_errors_exit_before_the_engine(
    tiny_model: Path, tmp_path: Path, bad_line: str, message: str
) -> None:
    inp = tmp_path / "input.jsonl"
    inp.write_text(f"{chat_line(0)}\n{chat_line(1)}\n{bad_line}\n{chat_line(3)}\n")
    started = time.monotonic()
    result = run_cli(command(tiny_model, str(inp), str(tmp_path / "out.jsonl")))
    _fails_fast(result, time.monotonic() - started, 2)
    assert message in result.stderr


def test_strict_lists_errors_before_the_engine(tiny_model: Path, input_file: Path) -> None:
    started = time.monotonic()
    out = input_file.parent / "strict.jsonl"
    result = run_cli(command(tiny_model, str(input_file), str(out), "--strict"))
    _fails_fast(result, time.monotonic() - started, 2)
    assert "line 4: The model 'no-such-model' is not served here" in result.stderr
    assert "line 6: The url '/v1/embeddings' does not match" in result.stderr


def test_empty_input_gives_empty_output(tiny_model: Path, tmp_path: Path) -> None:
    inp = tmp_path / "input.jsonl"
    inp.write_text("\n")
    out = tmp_path / "out.jsonl"
    started = time.monotonic()
    result = run_cli(command(tiny_model, str(inp), str(out)))
    _fails_fast(result, time.monotonic() - started, 0)
    assert out.read_bytes() == b""


def test_unreadable_input_and_unknown_flags(tiny_model: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    result = run_cli(command(tiny_model, str(tmp_path / "missing.jsonl"), str(tmp_path / "o")))
    _fails_fast(result, time.monotonic() - started, 1)
    assert "cannot read input" in result.stderr
    inp = tmp_path / "input.jsonl"
    inp.write_text(chat_line(0) + "\n")
    started = time.monotonic()
    result = run_cli(command(tiny_model, str(inp), str(tmp_path / "o"), "--kv-cache-dtype", "fp8"))
    _fails_fast(result, time.monotonic() - started, 2)
    assert "unsupported option(s) for `vllm-batch run`: --kv-cache-dtype fp8" in result.stderr
