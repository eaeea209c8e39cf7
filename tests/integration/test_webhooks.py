"""Webhooks end to end: a real server, real receivers on loopback, both databases.

Receivers listen on 127.0.0.2, the only address the servers allow, so ``localhost`` and
``127.0.0.1`` stay refused and the allow list is exercised for real.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from sqlalchemy import update
from standardwebhooks import Webhook

from tests.conftest import TINY_NAME, LiveServer, LoopThread, engine_settings, start_server
from tests.helpers import chat_line, jsonl, wait_for_batch
from tests.webhook_receiver import Receiver, webhook_receiver
from vllm_batch.batches.store.rows import BatchRow
from vllm_batch.protocol.webhook_event import new_secret

SECRET = new_secret()
FAST_RETRIES = {
    "webhook_secret": SECRET,
    "webhook_allowed_hosts": ["127.0.0.2"],
    "delivery_backoff_base": 0.2,
    "delivery_backoff_max": 1.0,
    "delivery_poll_interval": 0.1,
}


@pytest.fixture(scope="module")
def receiver(database_url: str) -> Iterator[Receiver]:
    """One receiver per database backend (so each backend's requests are its own)."""
    with webhook_receiver("127.0.0.2") as found:
        yield found


def _settings(tiny_model: Path, database_url: str, data: Path, receiver: Receiver, **extra: Any):  # type: ignore[no-untyped-def]
    return engine_settings(
        tiny_model,
        database_url=database_url,
        data_dir=data,
        webhook_urls=[receiver.url + "/server-wide"],
        **FAST_RETRIES,
        **extra,
    )


@pytest.fixture(scope="module")
def server(
    loop_thread: LoopThread,
    tiny_engine: Any,
    tiny_model: Path,
    database_url: str,
    receiver: Receiver,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    settings = _settings(tiny_model, database_url, tmp_path_factory.mktemp("d"), receiver)
    yield from start_server(loop_thread, settings, tiny_engine)


@pytest.fixture(scope="module")
def idle_server(
    loop_thread: LoopThread,
    tiny_model: Path,
    database_url: str,
    receiver: Receiver,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    """No worker: batches stay in progress until cancelled or expired."""
    settings = _settings(
        tiny_model, database_url, tmp_path_factory.mktemp("idle"), receiver, worker=False
    )
    yield from start_server(loop_thread, settings, None)


def client_for(server: LiveServer) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def submit(client: OpenAI, lines: list[Any], **kwargs: Any) -> Any:
    upload = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        **kwargs,
    )


def deliveries(server: LiveServer, batch_id: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{server.base_url}/batches/{batch_id}/deliveries")
    response.raise_for_status()
    data: list[dict[str, Any]] = response.json()["data"]
    return data


def wait_deliveries(
    server: LiveServer, batch_id: str, count: int, timeout: float = 30
) -> list[dict[str, Any]]:
    """Wait until ``count`` deliveries exist and none is pending any more."""
    deadline = time.monotonic() + timeout
    while True:
        found = deliveries(server, batch_id)
        if len(found) == count and all(d["status"] != "pending" for d in found):
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"deliveries of {batch_id}: {found}")
        time.sleep(0.1)


def verified(body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    """The event, verified both ways a receiver would; they must agree."""
    payload: dict[str, Any] = Webhook(SECRET).verify(body, headers)
    event = openai.OpenAI(api_key="x", webhook_secret=SECRET).webhooks.unwrap(
        body.decode(), headers
    )
    assert event.id == payload["id"] and event.type == payload["type"]
    assert event.data.id == payload["data"]["id"]
    return payload


def events_for(
    receiver: Receiver, path: str, batch_id: str, timeout: float = 30
) -> list[dict[str, Any]]:
    """Verified events about ``batch_id`` received on ``path`` (waits for the first)."""
    deadline = time.monotonic() + timeout
    while True:
        events = [verified(r.body, r.headers) for r in receiver.at(path)]
        mine = [e for e in events if e["data"]["id"] == batch_id]
        if mine or time.monotonic() > deadline:
            return mine
        time.sleep(0.05)


def test_completed_batch_notifies_every_target(server: LiveServer, receiver: Receiver) -> None:
    client = client_for(server)
    hook = receiver.script("/done", 200)
    batch = submit(
        client, [chat_line(i, TINY_NAME) for i in range(3)], metadata={"webhook_url": hook}
    )
    final = wait_for_batch(client, batch.id)
    assert final.status == "completed"
    [request] = receiver.wait_for("/done", 1)
    event = verified(request.body, request.headers)
    assert event == {
        "object": "event",
        "id": event["id"],
        "type": "batch.completed",
        "created_at": final.completed_at,
        "data": {"id": batch.id},
    }
    assert event["id"].startswith("evt_") and request.headers["webhook-id"] == event["id"]
    server_wide = events_for(receiver, "/server-wide", batch.id)
    assert len(server_wide) == 1 and server_wide[0]["id"] == event["id"]

    found = wait_deliveries(server, batch.id, 2)
    assert {d["target"] for d in found} == {hook, receiver.url + "/server-wide"}
    for delivery in found:
        assert delivery["kind"] == "webhook" and delivery["event_type"] == "batch.completed"
        assert delivery["status"] == "succeeded" and delivery["attempts"] == 1
        assert delivery["history"][0]["status_code"] == 200 and delivery["history"][0]["ok"]
    info = httpx.get(server.url + "/").json()
    assert info["deliveries"]["succeeded"] >= 2
    assert info["handlers"]["webhooks"] is True and info["handlers"]["server_webhook_urls"] == 1


def test_receiver_failing_twice_gets_three_attempts(server: LiveServer, receiver: Receiver) -> None:
    client = client_for(server)
    hook = receiver.script("/flaky", 500, 500, 200)
    batch = submit(client, [chat_line(0, TINY_NAME)], metadata={"webhook_url": hook})
    assert wait_for_batch(client, batch.id).status == "completed"
    requests = receiver.wait_for("/flaky", 3)
    time.sleep(1.5)  # a fourth request would be a bug
    assert len(receiver.at("/flaky")) == 3
    assert len({r.headers["webhook-id"] for r in requests}) == 1  # one event, retried
    for r in requests:
        verified(r.body, r.headers)  # each attempt freshly signed
    [delivery] = [d for d in wait_deliveries(server, batch.id, 2) if d["target"] == hook]
    assert delivery["status"] == "succeeded" and delivery["attempts"] == 3
    history = delivery["history"]
    assert [(a["number"], a["status_code"], a["ok"]) for a in history] == [
        (1, 500, False),
        (2, 500, False),
        (3, 200, True),
    ]
    assert "HTTP 500" in history[0]["error"]
    assert history[0]["finished_at"] <= history[1]["started_at"] <= history[2]["started_at"]


def test_every_final_status_sends_its_own_event(
    idle_server: LiveServer, receiver: Receiver
) -> None:
    client = client_for(idle_server)

    def hooked(name: str) -> dict[str, str]:
        return {"webhook_url": receiver.script(f"/{name}", 200)}

    failed = submit(client, [{"custom_id": "x"}], metadata=hooked("failed"))
    cancelled = submit(client, [chat_line(0, TINY_NAME)], metadata=hooked("cancelled"))
    expired = submit(client, [chat_line(0, TINY_NAME)], metadata=hooked("expired"))
    for batch in (cancelled, expired):
        wait_for_batch(client, batch.id, statuses={"in_progress"}, timeout=30)
    client.batches.cancel(cancelled.id)

    async def overdue(session: Any) -> None:
        async with session.begin():
            await session.execute(
                update(BatchRow).where(BatchRow.id == expired.id).values(expires_at=0)
            )

    idle_server.db(overdue)
    for batch, status in ((failed, "failed"), (cancelled, "cancelled"), (expired, "expired")):
        assert wait_for_batch(client, batch.id, timeout=30).status == status
        [request] = receiver.wait_for(f"/{status}", 1)
        event = verified(request.body, request.headers)
        assert event["type"] == f"batch.{status}" and event["data"] == {"id": batch.id}
        kinds = {(d["kind"], d["event_type"]) for d in wait_deliveries(idle_server, batch.id, 2)}
        assert kinds == {("webhook", f"batch.{status}")}


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://127.0.0.2/hook", "must use http or https"),
        ("http://127.0.0.1:8080/hook", "loopback"),
        ("http://localhost:8080/hook", "loopback address: localhost (127.0.0.1)"),
        ("http://169.254.169.254/latest/meta-data/", "metadata"),
        ("http://10.0.0.1/hook", "private"),
        ("http://[::1]/hook", "loopback"),
        ("not a url", "must use http or https"),
    ],
)
def test_refused_webhook_url_fails_creation(idle_server: LiveServer, url: str, reason: str) -> None:
    client = client_for(idle_server)
    before = client.batches.list(limit=100).data
    with pytest.raises(openai.BadRequestError) as info:
        submit(client, [chat_line(0, TINY_NAME)], metadata={"webhook_url": url})
    error = info.value.body
    assert isinstance(error, dict)
    assert error["param"] == "metadata.webhook_url" and error["code"] == "invalid_webhook_url"
    assert reason in error["message"] and "metadata.webhook_url" in error["message"]
    assert len(client.batches.list(limit=100).data) == len(before)  # nothing created


def test_deliveries_of_unknown_batch_is_404(idle_server: LiveServer) -> None:
    response = httpx.get(f"{idle_server.base_url}/batches/batch_nope/deliveries")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
