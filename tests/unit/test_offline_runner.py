"""``run_batch`` end to end on a fake engine: order, error lines, resume, strict, URLs."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_offline_io import FileServer
from vllm_batch.config import ModelSpec, Settings
from vllm_batch.engines.engine import EngineFailure, EngineResult
from vllm_batch.engines.vllm_engine import error_result
from vllm_batch.offline import RunFailed, RunOptions, run_batch
from vllm_batch.offline.run_metrics import MetricsAddress

SPEC = ModelSpec("tiny", "/models/tiny")


class FakeEngine:
    """Answers chat requests after a random delay, echoing the prompt; can break at one line."""

    def __init__(
        self,
        fail_on: str | None = None,
        start_seconds: float = 0.0,
        start_error: str | None = None,
    ) -> None:
        self.model_name = SPEC.name
        self.fail_on = fail_on
        self.start_seconds = start_seconds
        self.start_error = start_error
        self.seen: list[str] = []
        self.started = self.stopped = self.start_cancelled = False
        self.rng = random.Random(0)

    @property
    def max_in_flight(self) -> int:
        return 8

    async def start(self) -> None:
        try:
            await asyncio.sleep(self.start_seconds)
        except asyncio.CancelledError:
            self.start_cancelled = True
            raise
        if self.start_error is not None:
            raise RuntimeError(self.start_error)
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> EngineResult:
        content = body["messages"][0]["content"]
        self.seen.append(content)
        if content == self.fail_on:
            raise EngineFailure("GPU fell off")
        await asyncio.sleep(self.rng.random() * 0.01)
        if url != "/v1/chat/completions":
            return error_result(400, "invalid_request_error", f"unsupported {url}")
        message = {"role": "assistant", "content": content.upper()}
        body_json = json.dumps(
            {"id": request_id, "object": "chat.completion", "choices": [{"message": message}]}
        )
        return EngineResult(200, body_json, output_tokens=2)


def request(i: int, model: str = "tiny", url: str = "/v1/chat/completions") -> str:
    body = {"model": model, "messages": [{"role": "user", "content": f"q{i}"}]}
    return json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body})


def write_input(path: Path, count: int, special: dict[int, str] | None = None) -> Path:
    lines = [(special or {}).get(i, request(i)) for i in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


class Factory:
    def __init__(self, engine: FakeEngine | None = None) -> None:
        self.engine = engine or FakeEngine()
        self.calls = 0

    def __call__(self, spec: ModelSpec, settings: Settings) -> FakeEngine:
        assert spec == SPEC
        self.calls += 1
        return self.engine


def options(inp: Path | str, out: Path | str, **kwargs: Any) -> RunOptions:
    values: dict[str, Any] = {"progress_tty": False, "progress_interval": 0.0}
    values.update(kwargs)
    return RunOptions(input=str(inp), output=str(out), spec=SPEC, settings=Settings(), **values)


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_output_is_in_input_order_with_error_lines(tmp_path: Path) -> None:
    special = {3: request(3, model="other"), 5: request(5, url="/v1/embeddings")}
    inp = write_input(tmp_path / "in.jsonl", 60, special)
    factory = Factory()
    summary = run_batch(options(inp, tmp_path / "out.jsonl"), factory)
    lines = read_lines(tmp_path / "out.jsonl")
    assert [line["custom_id"] for line in lines] == [f"req-{i}" for i in range(60)]
    assert summary.total == 60 and summary.finished == 60 and summary.errors == 2
    assert lines[0]["response"]["body"]["choices"][0]["message"]["content"] == "Q0"
    assert lines[3]["response"] == {
        "status_code": 404,
        "request_id": lines[3]["response"]["request_id"],
        "body": None,
    }
    # vLLM's ``ErrorResponse`` under ``error``, with the HTTP status as its code.
    assert lines[3]["error"]["error"]["code"] == 404
    assert lines[3]["error"]["error"]["type"] == "NotFoundError"
    assert lines[3]["error"]["error"]["param"] == "model"
    assert "`other` does not exist" in lines[3]["error"]["error"]["message"]
    assert lines[5]["response"]["status_code"] == 400 and lines[5]["response"]["body"] is None
    assert lines[5]["error"]["error"]["code"] == 400
    assert "q3" not in factory.engine.seen  # the unknown model never reached the engine
    assert factory.engine.started and factory.engine.stopped


def test_structural_errors_stop_the_starting_engine(tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 5, {2: '{"custom_id": "x"}', 3: "nope"})
    engine = FakeEngine(start_seconds=3600)  # still starting when the input is found bad
    with pytest.raises(RunFailed) as info:
        run_batch(options(inp, tmp_path / "out.jsonl"), Factory(engine))
    assert info.value.exit_code == 2
    assert "line 3: missing required field(s) 'method', 'url', 'body'" in info.value.message
    assert "line 4: not valid JSON" in info.value.message
    assert engine.start_cancelled and engine.stopped and not engine.started
    assert engine.seen == [] and list(tmp_path.iterdir()) == [inp]


def test_engine_start_failure_is_reported(tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 5)
    engine = FakeEngine(start_seconds=0.05, start_error="no such model")
    with pytest.raises(RunFailed) as info:
        run_batch(options(inp, tmp_path / "out.jsonl"), Factory(engine))
    assert info.value.exit_code == 1
    assert info.value.message.startswith("could not start the engine: no such model (0 of 5")
    assert not (tmp_path / "out.jsonl").exists() and engine.stopped


def test_bad_input_wins_over_a_failed_engine_start(tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 3, {1: "nope"})
    engine = FakeEngine(start_error="no such model")  # fails before the input is read
    with pytest.raises(RunFailed) as info:
        run_batch(options(inp, tmp_path / "out.jsonl"), Factory(engine))
    assert info.value.exit_code == 2 and "line 2: not valid JSON" in info.value.message


def test_missing_input_fails(tmp_path: Path) -> None:
    with pytest.raises(RunFailed) as info:
        run_batch(options(tmp_path / "nope.jsonl", tmp_path / "out.jsonl"), Factory())
    assert info.value.exit_code == 1 and "no such file" in info.value.message


def test_empty_input_gives_empty_output_without_an_engine(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n\n")
    out = tmp_path / "out.jsonl"
    out.write_text("stale\n")
    factory = Factory(FakeEngine(start_seconds=3600))
    assert run_batch(options(inp, out), factory).total == 0
    assert out.read_bytes() == b""
    assert factory.engine.start_cancelled and factory.engine.stopped


def test_strict_lists_errors_before_the_engine(tmp_path: Path) -> None:
    special = {1: request(1, model="other"), 4: request(4, url="/v1/completions")}
    inp = write_input(tmp_path / "in.jsonl", 6, special)
    factory = Factory(FakeEngine(start_seconds=3600))
    with pytest.raises(RunFailed) as info:
        run_batch(options(inp, tmp_path / "out.jsonl", strict=True), factory)
    assert info.value.exit_code == 2 and factory.engine.start_cancelled
    assert "line 2: The model 'other' is not served here" in info.value.message
    assert "line 5:" in info.value.message


def test_engine_failure_keeps_the_prefix_and_resume_finishes(tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 40)
    out = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    with pytest.raises(RunFailed, match="engine failed") as info:
        run_batch(options(inp, out), Factory(FakeEngine(fail_on="q25")))
    assert info.value.exit_code == 1
    assert not out.exists()  # only the .partial file: nobody mistakes it for a result
    assert f"the partial output is {partial}: rerun with --resume" in info.value.message
    before = read_lines(partial)
    assert 0 < len(before) <= 25
    with partial.open("a") as handle:
        handle.write('{"id": "partial", "cust')  # as if killed mid-write
    engine = FakeEngine()
    summary = run_batch(options(inp, out, resume=True), Factory(engine))
    assert not partial.exists()
    after = read_lines(out)
    assert [line["custom_id"] for line in after] == [f"req-{i}" for i in range(40)]
    assert after[: len(before)] == before
    assert summary.resumed == len(before) and summary.finished == 40 - len(before)
    assert sorted(engine.seen) == sorted(f"q{i}" for i in range(len(before), 40))


def test_resume_of_a_complete_output_does_nothing(tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 5)
    out = tmp_path / "out.jsonl"
    run_batch(options(inp, out), Factory())
    data = out.read_bytes()
    factory = Factory()
    assert run_batch(options(inp, out, resume=True), factory).resumed == 5
    assert out.read_bytes() == data and factory.engine.seen == [] and factory.engine.stopped


def test_resume_refuses_another_input(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    run_batch(options(write_input(tmp_path / "a.jsonl", 5), out), Factory())
    other = tmp_path / "b.jsonl"
    other.write_text("\n".join(request(i).replace("req-", "other-") for i in range(5)) + "\n")
    with pytest.raises(RunFailed, match="not from this input") as info:
        run_batch(options(other, out, resume=True), Factory())
    assert info.value.exit_code == 2


def test_url_input_and_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "sleep", lambda _s: None)
    data = write_input(tmp_path / "in.jsonl", 20).read_bytes()
    spool = tmp_path / "spool"
    spool.mkdir()
    with FileServer({"/in.jsonl": data}, fail_puts=1) as server:
        run_batch(
            options(f"{server.url}/in.jsonl", f"{server.url}/out", output_tmp_dir=str(spool)),
            Factory(),
        )
    lines = [json.loads(line) for line in server.received["/out"].splitlines()]
    assert [line["custom_id"] for line in lines] == [f"req-{i}" for i in range(20)]
    assert server.put_attempts == 2 and list(spool.iterdir()) == []  # temp files removed


def test_failed_upload_keeps_the_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "sleep", lambda _s: None)
    inp = write_input(tmp_path / "in.jsonl", 3)
    with FileServer(fail_puts=99) as server, pytest.raises(RunFailed) as info:
        run_batch(options(inp, f"{server.url}/out", output_tmp_dir=str(tmp_path)), Factory())
    assert info.value.exit_code == 1 and "kept at" in info.value.message
    kept = Path(info.value.message.rsplit("kept at ", 1)[1])
    assert len(kept.read_text().splitlines()) == 3


def test_unreadable_url_input_fails(tmp_path: Path) -> None:
    with FileServer() as server, pytest.raises(RunFailed, match="HTTP 404") as info:
        run_batch(options(f"{server.url}/missing", tmp_path / "out.jsonl"), Factory())
    assert info.value.exit_code == 1


def test_progress_log_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vllm_batch.offline.progress")
    inp = write_input(tmp_path / "in.jsonl", 10, {0: request(0, model="nope")})
    run_batch(options(inp, tmp_path / "out.jsonl"), Factory())
    messages = [r.getMessage() for r in caplog.records if r.name.endswith("progress")]
    assert messages[0].startswith("progress: 0/10 done")
    assert messages[-1].startswith("progress: 10/10 done (100.0%)")
    assert "req/s" in messages[-1] and "tok/s" in messages[-1] and "1 errors" in messages[-1]


def test_unusable_tmp_dir_fails_cleanly(tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 2)
    missing = str(tmp_path / "no" / "dir")
    with pytest.raises(RunFailed, match="cannot create a temporary file") as info:
        run_batch(options(inp, "http://127.0.0.1:9/out", output_tmp_dir=missing), Factory())
    assert info.value.exit_code == 1


def test_vllm_spellings_of_the_pooling_urls(tmp_path: Path) -> None:
    """``vllm run-batch`` takes ``/score``, ``/rerank`` and ``/v2/rerank``; they reach the
    engine as the endpoints they name (other URLs as they are)."""

    class Recorder(FakeEngine):
        def __init__(self) -> None:
            super().__init__()
            self.urls: list[str] = []

        async def run(self, url: str, body: dict[str, Any], request_id: str) -> EngineResult:
            self.urls.append(url)
            return await super().run(url, body, request_id)

    urls = ["/score", "/rerank", "/v2/rerank", "/v1/score", "/v3/score"]
    inp = write_input(tmp_path / "in.jsonl", 5, {i: request(i, url=u) for i, u in enumerate(urls)})
    engine = Recorder()
    run_batch(options(inp, tmp_path / "out.jsonl"), Factory(engine))
    assert sorted(engine.urls) == sorted(
        ["/v1/score", "/v1/rerank", "/v1/rerank", "/v1/score", "/v3/score"]
    )


def test_metrics_port_in_use_fails_before_the_engine(tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        factory = Factory()
        with pytest.raises(RunFailed) as info:
            run_batch(
                options(inp, tmp_path / "out.jsonl", metrics=MetricsAddress("127.0.0.1", port)),
                factory,
            )
    assert info.value.exit_code == 1
    assert info.value.message.startswith(f"cannot serve metrics on 127.0.0.1:{port}: ")
    assert "Address already in use" in info.value.message
    assert factory.calls == 0 and list(tmp_path.iterdir()) == [inp]
