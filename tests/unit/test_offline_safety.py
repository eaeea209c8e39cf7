"""``vllm-batch run`` safety: input never overwritten, bounded memory, partial output marked,
pre-signed URLs never logged, and no database code on the ``run`` path.

The engines here are fakes for pure pipeline logic (ordering, back-pressure, signals); the
real engine runs in tests/e2e/test_run_command.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_offline_io import FileServer
from tests.unit.test_offline_runner import Factory, FakeEngine, options, read_lines, write_input
from vllm_batch.engines.engine import EngineResult
from vllm_batch.offline import RunFailed, run_batch
from vllm_batch.offline.writer import OrderedWriter
from vllm_batch.pipeline.dispatch import Dispatcher
from vllm_batch.pipeline.line_result import LineResult

SECRET = "X-Amz-Signature=s3cr3tsig"


class SlowFirstLineEngine:
    """Line 0 takes ``delay`` seconds; every other line answers at once. Counts submissions."""

    model_name = "tiny"

    def __init__(self, delay: float, in_flight: int = 8) -> None:
        self.delay = delay
        self.in_flight = in_flight
        self.submitted: list[int] = []
        self.submitted_while_first_ran = 0
        self._first_running = False

    @property
    def max_in_flight(self) -> int:
        return self.in_flight

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> EngineResult:
        index = int(body["messages"][-1]["content"][1:])
        self.submitted.append(index)
        if index == 0:
            self._first_running = True
            await asyncio.sleep(self.delay)
            self._first_running = False
        elif self._first_running:
            self.submitted_while_first_ran += 1
        return EngineResult(200, json.dumps({"i": index}), output_tokens=1)


def _line(i: int) -> bytes:
    body = {"model": "tiny", "messages": [{"role": "user", "content": f"q{i}"}]}
    return json.dumps({"custom_id": f"c{i}", "url": "/v1/chat/completions", "body": body}).encode()


def _lines(count: int) -> list[tuple[int, bytes]]:
    return [(i, _line(i)) for i in range(count)]


class CountingHandle:
    """A binary sink that keeps what is written (stands in for the output file)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> int:
        self.data += data
        return len(data)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("bound", [1, 5, 40])
def test_slow_first_line_keeps_the_reorder_buffer_bounded(bound: int) -> None:
    engine = SlowFirstLineEngine(delay=0.3)
    handle = CountingHandle()
    writer = OrderedWriter(handle, max_buffered=bound)  # type: ignore[arg-type]
    sizes: list[int] = []

    def on_result(result: LineResult) -> None:
        writer.add(result)
        sizes.append(len(writer.buffer))

    dispatcher = Dispatcher(
        engine, on_result, lambda i: f"r{i}", group_prefixes=False, horizon=writer.horizon
    )
    total = 300

    async def go() -> None:
        source = (item for item in _lines(total))
        await dispatcher.run(source)

    asyncio.run(go())
    out = [json.loads(line) for line in handle.data.decode().splitlines()]
    assert [line["custom_id"] for line in out] == [f"c{i}" for i in range(total)]
    assert sorted(engine.submitted) == list(range(total))  # each line exactly once
    assert max(sizes) == writer.peak_buffered == bound  # the bound was reached, never passed
    # While line 0 was stuck, only the lines within the bound were submitted.
    assert engine.submitted_while_first_ran <= bound


def test_without_a_horizon_the_buffer_grows() -> None:
    """The problem the bound solves: one slow line and everything behind it piles up."""
    engine = SlowFirstLineEngine(delay=0.3)
    writer = OrderedWriter(CountingHandle())  # type: ignore[arg-type]
    dispatcher = Dispatcher(engine, writer.add, lambda i: f"r{i}", group_prefixes=False)
    asyncio.run(dispatcher.run(item for item in _lines(300)))
    assert writer.peak_buffered == 299


def test_run_with_a_slow_first_line_and_prefix_grouping(tmp_path: Path) -> None:
    """Prefix grouping submits even lines before odd ones; the bound must not deadlock."""
    inp = tmp_path / "in.jsonl"
    lines = []
    for i in range(500):
        messages = [
            {"role": "system", "content": "even" if i % 2 == 0 else "odd"},
            {"role": "user", "content": f"q{i}"},
        ]
        body = {"model": "tiny", "messages": messages}
        line = {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions"}
        lines.append(json.dumps({**line, "body": body}))
    inp.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    engine = SlowFirstLineEngine(delay=0.3)
    summary = run_batch(options(inp, out, max_buffered=16), Factory(engine))  # type: ignore[arg-type]
    assert [line["custom_id"] for line in read_lines(out)] == [f"req-{i}" for i in range(500)]
    assert summary.peak_buffered == 16 and sorted(engine.submitted) == list(range(500))
    assert engine.submitted_while_first_ran <= 16


@pytest.mark.parametrize("spelling", ["same", "relative", "symlink", "symlink-dir"])
def test_output_that_is_the_input_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spelling: str
) -> None:
    inp = write_input(tmp_path / "in.jsonl", 5)
    before = inp.read_bytes()
    monkeypatch.chdir(tmp_path)
    out: Path | str = inp
    if spelling == "relative":
        (tmp_path / "sub").mkdir()
        out = "sub/../in.jsonl"
    elif spelling == "symlink":
        (tmp_path / "link.jsonl").symlink_to(inp)
        out = "link.jsonl"
    elif spelling == "symlink-dir":
        (tmp_path / "alias").symlink_to(tmp_path, target_is_directory=True)
        out = tmp_path / "alias" / "in.jsonl"
    factory = Factory()
    with pytest.raises(RunFailed, match="is the input file") as info:
        run_batch(options("in.jsonl", out), factory)
    assert info.value.exit_code == 2 and factory.calls == 0
    assert inp.read_bytes() == before
    assert not (tmp_path / "in.jsonl.partial").exists()


def test_resume_onto_the_input_is_refused_too(tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 5)
    before = inp.read_bytes()
    with pytest.raises(RunFailed, match="is the input file"):
        run_batch(options(inp, inp, resume=True), Factory())
    assert inp.read_bytes() == before


class SignalAtLine(FakeEngine):
    """Sends ``sig`` to this process when line ``at`` is submitted (as Ctrl-C / kill would)."""

    def __init__(self, sig: signal.Signals, at: str) -> None:
        super().__init__()
        self.sig = sig
        self.at = at

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> EngineResult:
        if body["messages"][0]["content"] == self.at:
            os.kill(os.getpid(), self.sig)
        return await super().run(url, body, request_id)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_leaves_only_a_partial_file(tmp_path: Path, sig: signal.Signals) -> None:
    inp = write_input(tmp_path / "in.jsonl", 300)
    out = tmp_path / "out.jsonl"
    out.write_text("an older complete output\n")
    partial = tmp_path / "out.jsonl.partial"
    with pytest.raises(RunFailed, match="stopped early") as info:
        run_batch(options(inp, out), Factory(SignalAtLine(sig, "q40")))
    assert info.value.exit_code == 1 and "rerun with --resume" in info.value.message
    assert out.read_text() == "an older complete output\n"  # untouched until a run completes
    done = read_lines(partial)
    assert 0 < len(done) < 300
    assert [line["custom_id"] for line in done] == [f"req-{i}" for i in range(len(done))]
    summary = run_batch(options(inp, out, resume=True), Factory())
    assert summary.resumed == len(done) and not partial.exists()
    assert [line["custom_id"] for line in read_lines(out)] == [f"req-{i}" for i in range(300)]


def test_interrupted_run_uploads_nothing(tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 300)
    spool = tmp_path / "spool"
    spool.mkdir()
    with FileServer() as server, pytest.raises(RunFailed, match="stopped early") as info:
        run_batch(
            options(inp, f"{server.url}/out.jsonl", output_tmp_dir=str(spool)),
            Factory(SignalAtLine(signal.SIGTERM, "q40")),
        )
    assert "nothing was uploaded" in info.value.message and info.value.exit_code == 1
    assert server.put_attempts == 0 and list(spool.iterdir()) == []


def test_resume_accepts_an_output_written_in_place(tmp_path: Path) -> None:
    """An interrupted output from before ``.partial`` existed (or a copy) still resumes."""
    inp = write_input(tmp_path / "in.jsonl", 10)
    out = tmp_path / "out.jsonl"
    run_batch(options(inp, out), Factory())
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4]))
    summary = run_batch(options(inp, out, resume=True), Factory())
    assert summary.resumed == 4 and read_lines(out)[:4] == [json.loads(x) for x in lines[:4]]
    assert len(read_lines(out)) == 10 and not (tmp_path / "out.jsonl.partial").exists()


def _signed_server(data: bytes, fail_puts: int) -> FileServer:
    return FileServer({f"/in.jsonl?{SECRET}": data}, fail_puts=fail_puts)


def test_signed_urls_are_never_logged_or_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(time, "sleep", lambda _s: None)
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="httpx")  # other tests may have quietened it
    data = write_input(tmp_path / "in.jsonl", 5).read_bytes()
    with _signed_server(data, fail_puts=99) as server, pytest.raises(RunFailed) as info:
        with_user = server.url.replace("http://", "http://user:pw@")
        run_batch(
            options(
                f"{server.url}/in.jsonl?{SECRET}",
                f"{with_user}/out.jsonl?{SECRET}",
                output_tmp_dir=str(tmp_path),
            ),
            Factory(),
        )
    assert server.put_attempts == 5  # the signed URL was used, all five uploads failed
    messages = [record.getMessage() for record in caplog.records]
    assert any("HTTP Request: PUT" in message for message in messages)  # httpx's own line
    assert any("failed (attempt 1/5" in message for message in messages)
    for text in [*messages, info.value.message]:
        assert "s3cr3tsig" not in text and "pw@" not in text, text
    assert f"{server.url}/out.jsonl?…" in info.value.message


def test_unreadable_signed_input_is_reported_without_the_signature(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="httpx")  # other tests may have quietened it
    with FileServer() as server, pytest.raises(RunFailed, match="HTTP 404") as info:
        run_batch(options(f"{server.url}/missing?{SECRET}", tmp_path / "out.jsonl"), Factory())
    texts = [record.getMessage() for record in caplog.records] + [info.value.message]
    assert texts and all("s3cr3tsig" not in text for text in texts)


def test_cli_done_line_redacts_a_signed_output(tmp_path: Path) -> None:
    """The CLI's own lines (``done: ... -> URL``) go through the same redaction."""
    data = write_input(tmp_path / "in.jsonl", 0).read_bytes()
    with _signed_server(data, fail_puts=0) as server:
        result = _cli(
            "-i",
            f"{server.url}/in.jsonl?{SECRET}",
            "-o",
            f"{server.url}/out.jsonl?{SECRET}",
        )
    assert result.returncode == 0, result.stderr
    assert "done: 0 requests" in result.stderr and "s3cr3tsig" not in result.stderr


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``vllm-batch run`` in a fresh interpreter; prints the loaded sqlalchemy modules at exit."""
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('SQLALCHEMY=' + ','.join(sorted("
        "m for m in sys.modules if m.split('.')[0] == 'sqlalchemy')), file=sys.stderr))\n"
        "from vllm_batch.cli import main\n"
        "sys.argv = ['vllm-batch', 'run', *sys.argv[1:]]\n"
        "main()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run(
        [sys.executable, "-c", code, *args, "--model", "/models/none"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_the_runner_imports_no_database_code() -> None:
    code = (
        "import sys\n"
        "import vllm_batch.offline.runner, vllm_batch.pipeline.dispatch, vllm_batch.retry\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sqlalchemy'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_cli_run_refuses_its_input_as_output_without_database_code(tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 3)
    before = inp.read_bytes()
    result = _cli("-i", str(inp), "-o", str(tmp_path / "." / "in.jsonl"))
    assert result.returncode == 2, result.stderr
    assert "is the input file" in result.stderr and "error:" in result.stderr
    assert inp.read_bytes() == before
    loaded = [line for line in result.stderr.splitlines() if line.startswith("SQLALCHEMY=")]
    assert loaded == ["SQLALCHEMY="], result.stderr
