"""Result handlers run by a real server through the delivery outbox, on both databases.

In-process handlers (sync, async, raising), a seed-style handler imported from
``VLLM_BATCH_HANDLER_MODULES`` with the original ``result_handlers`` imports, the example
package installed with pip and found through its entry point, and the built-in template
handler configured from settings.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.conftest import TINY_NAME, LiveServer, LoopThread, engine_settings, start_server
from tests.helpers import chat_line, jsonl, parse_jsonl, wait_for_batch
from vllm_batch.handlers import ResultHandler, answer_text, get_registry, register_handler

ROOT = Path(__file__).resolve().parents[2]
SEED_HANDLER = '''
from result_handlers.base import ResultHandler
from result_handlers import register_handler
import json, os

class SeedHandler(ResultHandler):
    """Written for the original layout: enabled() without metadata, len(results)."""

    def name(self):
        return "seed_style"

    def enabled(self):
        return True

    def handle(self, batch_id, results, metadata):
        ids = [r["custom_id"] for r in results]
        with open(os.path.join(os.environ["SEED_OUT"], batch_id + ".json"), "w") as f:
            json.dump({"count": len(results), "ids": ids, "metadata": metadata}, f)
        return True

register_handler(SeedHandler())
'''
CSV_TEMPLATE = """custom_id,ok,answer
{% for r in results %}{{ [r.custom_id, (not r.error)|string, r|answer]|csv }}
{% endfor %}"""


class Recording(ResultHandler):
    """Keeps what it saw, to compare with the output file."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name
        self.seen: dict[str, list[dict[str, Any]]] = {}
        self.threads: set[str] = set()

    def name(self) -> str:
        return self._name

    def enabled(self, metadata: dict[str, Any] | None = None) -> bool:
        return (metadata or {}).get("skip") != self._name

    def handle(
        self, batch_id: str, results: Iterable[dict[str, Any]], metadata: dict[str, Any]
    ) -> bool:
        self.threads.add(threading.current_thread().name)
        self.seen[batch_id] = list(results)
        return True


class AsyncRecording(Recording):
    async def handle(  # type: ignore[override]
        self, batch_id: str, results: Iterable[dict[str, Any]], metadata: dict[str, Any]
    ) -> bool:
        await asyncio.sleep(0.01)
        self.seen[batch_id] = [r for r in results]
        return True


class Raising(ResultHandler):
    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}
        self.errors: list[str] = []

    def name(self) -> str:
        return "raising"

    def enabled(self, metadata: dict[str, Any] | None = None) -> bool:
        return True

    def handle(
        self, batch_id: str, results: Iterable[dict[str, Any]], metadata: dict[str, Any]
    ) -> bool:
        self.calls[batch_id] = self.calls.get(batch_id, 0) + 1
        raise RuntimeError("downstream system is down")

    def on_error(self, error: Exception) -> None:
        self.errors.append(str(error))


class Handlers:
    def __init__(self) -> None:
        self.sync = Recording("recording")
        self.async_ = AsyncRecording("async_recording")
        self.raising = Raising()


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``pip install`` the example handler package into a directory on ``sys.path``."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
            "--no-build-isolation", "--target", str(target),
            str(ROOT / "examples" / "handler-package"),
        ],
        check=True,
    )  # fmt: skip
    (target / "seed_style_handler.py").write_text(SEED_HANDLER)
    sys.path.insert(0, str(target))
    try:
        yield target
    finally:
        sys.path.remove(str(target))
        sys.modules.pop("seed_style_handler", None)


@pytest.fixture(scope="module")
def handlers(
    installed_example: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Handlers]:
    made = Handlers()
    for handler in (made.sync, made.async_, made.raising):
        register_handler(handler)
    out = tmp_path_factory.mktemp("handler-out")
    saved = {name: os.environ.get(name) for name in ("JSONL_MIRROR_DIR", "SEED_OUT")}
    os.environ["JSONL_MIRROR_DIR"] = str(out / "mirror")
    os.environ["SEED_OUT"] = str(out)
    try:
        yield made
    finally:
        for name in ("recording", "async_recording", "raising", "seed_style", "jsonl_mirror"):
            get_registry().unregister(name)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def server(
    loop_thread: LoopThread,
    tiny_engine: Any,
    tiny_model: Path,
    database_url: str,
    handlers: Handlers,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    data = tmp_path_factory.mktemp("data")
    template = data / "answers.csv.j2"
    template.write_text(CSV_TEMPLATE)
    settings = engine_settings(
        tiny_model,
        database_url=database_url,
        data_dir=data,
        handler_modules=["seed_style_handler"],
        template_handler_template=template,
        template_handler_output=str(data / "rendered" / "{batch_id}.csv"),
        delivery_backoff_base=0.2,
        delivery_backoff_max=0.5,
        delivery_poll_interval=0.1,
        delivery_retry_horizon=3.0,
    )
    yield from start_server(loop_thread, settings, tiny_engine)


def wait_settled(server: LiveServer, batch_id: str, count: int) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + 60
    while True:
        data = httpx.get(f"{server.base_url}/batches/{batch_id}/deliveries").json()["data"]
        if len(data) == count and all(d["status"] != "pending" for d in data):
            return {d["target"]: d for d in data}
        if time.monotonic() > deadline:
            raise TimeoutError(json.dumps(data, indent=1))
        time.sleep(0.1)


def test_handlers_run_and_a_raising_one_changes_nothing(
    server: LiveServer, handlers: Handlers
) -> None:
    client = OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    lines = [chat_line(i, TINY_NAME) for i in range(5)] + [
        {**chat_line(5, TINY_NAME), "body": {"model": TINY_NAME, "messages": "not a list"}}
    ]
    upload = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"project": "handlers"},
    )
    final = wait_for_batch(client, batch.id)
    assert final.status == "completed"
    deliveries = wait_settled(server, batch.id, 6)

    # The raising handler: retried until its horizon, recorded, and harmless.
    raising = deliveries["raising"]
    assert raising["kind"] == "handler" and raising["status"] == "failed"
    assert raising["attempts"] >= 2
    assert [a["number"] for a in raising["history"]] == list(range(1, raising["attempts"] + 1))
    assert all("RuntimeError: downstream system is down" in a["error"] for a in raising["history"])
    assert handlers.raising.calls[batch.id] == raising["attempts"]
    assert handlers.raising.errors[0] == "downstream system is down"
    after = client.batches.retrieve(batch.id)
    assert after.status == "completed" and after.request_counts == final.request_counts
    output = parse_jsonl(client.files.content(final.output_file_id).text)
    errors = parse_jsonl(client.files.content(final.error_file_id).text)
    assert len(output) == 5 and len(errors) == 1

    # Every other handler succeeded once, on exactly the batch's result lines.
    for name in ("recording", "async_recording", "seed_style", "jsonl_mirror", "template"):
        assert deliveries[name]["status"] == "succeeded", deliveries[name]
        assert deliveries[name]["attempts"] == 1
    assert handlers.sync.seen[batch.id] == output + errors
    assert handlers.async_.seen[batch.id] == output + errors
    assert all(name.startswith("result-handler") for name in handlers.sync.threads)

    seed = json.loads((Path(os.environ["SEED_OUT"]) / f"{batch.id}.json").read_text())
    assert seed == {
        "count": 6,
        "ids": [r["custom_id"] for r in output + errors],
        "metadata": {"project": "handlers"},
    }
    mirror = parse_jsonl((Path(os.environ["JSONL_MIRROR_DIR"]) / f"{batch.id}.jsonl").read_text())
    assert mirror == [
        {"custom_id": r["custom_id"], "ok": not r["error"], "answer": answer_text(r)}
        for r in output + errors
    ]
    rendered = Path(str(server.settings.template_handler_output).format(batch_id=batch.id))
    with rendered.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["custom_id", "ok", "answer"]
    assert rows[1:] == [
        [r["custom_id"], str(not r["error"]), answer_text(r) or ""] for r in output + errors
    ]
    info = httpx.get(server.url + "/").json()
    assert {"raising", "seed_style", "jsonl_mirror", "template"} <= set(
        info["handlers"]["result_handlers"]
    )
    assert "label_studio" in info["handlers"]["result_handlers"]


def test_enabled_sees_metadata_and_failed_batches_run_no_handlers(
    server: LiveServer, handlers: Handlers
) -> None:
    client = OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    upload = client.files.create(
        file=("in.jsonl", jsonl([chat_line(0, TINY_NAME)])), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"skip": "recording", "jsonl_mirror": "off"},
    )
    assert wait_for_batch(client, batch.id).status == "completed"
    targets = set(wait_settled(server, batch.id, 4))
    assert targets == {"async_recording", "raising", "seed_style", "template"}
    assert batch.id not in handlers.sync.seen

    bad = client.files.create(file=("bad.jsonl", jsonl([{"custom_id": "x"}])), purpose="batch")
    failed = client.batches.create(
        input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert wait_for_batch(client, failed.id).status == "failed"
    time.sleep(0.5)
    data = httpx.get(f"{server.base_url}/batches/{failed.id}/deliveries").json()["data"]
    assert data == []  # no webhook configured, and a failed batch has no results to hand on
