"""One webhook POST against a real loopback receiver: signature, guard, redirects, limits."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from standardwebhooks import Webhook

from tests.webhook_receiver import Receiver, webhook_receiver
from vllm_batch.deliveries.webhook import MAX_RESPONSE_BYTES, deliver, display_target
from vllm_batch.net.guard import AllowList
from vllm_batch.protocol.webhook_event import check_secret, event_body, new_secret

LOOPBACK = AllowList(["127.0.0.1"])


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with webhook_receiver() as found:
        yield found


async def send(url: str, secret: str, allow: AllowList = LOOPBACK, timeout: float = 5):  # type: ignore[no-untyped-def]
    body = event_body("evt_123", "batch.completed", 1_700_000_000, "batch_abc")
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
        return await deliver(client, url, secret=secret, event_id="evt_123", body=body, allow=allow)


async def test_signed_event_verifies_with_standardwebhooks_and_openai(receiver: Receiver) -> None:
    secret = new_secret()
    outcome = await send(receiver.script("/ok", 204), secret)
    assert outcome.ok and outcome.status_code == 204
    [request] = receiver.at("/ok")
    assert request.headers["webhook-id"] == "evt_123"
    assert request.headers["webhook-signature"].startswith("v1,")
    assert request.headers["host"] == receiver.url.removeprefix("http://")
    payload = Webhook(secret).verify(request.body, request.headers)
    assert payload == {
        "object": "event",
        "id": "evt_123",
        "type": "batch.completed",
        "created_at": 1_700_000_000,
        "data": {"id": "batch_abc"},
    }
    event = openai.OpenAI(api_key="unused", webhook_secret=secret).webhooks.unwrap(
        request.body.decode(), request.headers
    )
    assert event.type == "batch.completed" and event.data.id == "batch_abc"
    with pytest.raises(Exception, match=r"[Ss]ignature"):
        Webhook(new_secret()).verify(request.body, request.headers)


async def test_refused_again_at_delivery_time(receiver: Receiver) -> None:
    outcome = await send(receiver.url + "/never", new_secret(), allow=AllowList([]))
    assert not outcome.ok and outcome.permanent and "loopback" in (outcome.error or "")
    assert receiver.at("/never") == []


async def test_failures_redirects_and_response_cap(receiver: Receiver) -> None:
    outcome = await send(receiver.script("/fail", 500), new_secret())
    assert (outcome.ok, outcome.status_code, outcome.permanent) == (False, 500, False)
    receiver.extra_headers["/moved"] = {"location": receiver.url + "/ok2"}
    outcome = await send(receiver.script("/moved", 302), new_secret())
    assert not outcome.ok and "redirect not followed" in (outcome.error or "")
    assert receiver.at("/ok2") == []
    receiver.response_bytes["/huge"] = 50 * 1024 * 1024
    outcome = await send(receiver.script("/huge", 200), new_secret())
    assert outcome.ok  # answered without reading 50 MiB
    assert MAX_RESPONSE_BYTES <= 64 * 1024


async def test_timeout_and_refused_connection(receiver: Receiver) -> None:
    receiver.delay["/slow"] = 3
    outcome = await send(receiver.script("/slow", 200), new_secret(), timeout=0.5)
    assert not outcome.ok and "Timeout" in (outcome.error or "")
    outcome = await send("http://127.0.0.1:9/closed", new_secret())
    assert not outcome.ok and outcome.status_code is None and outcome.error


def test_secret_and_display() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_") and check_secret(secret) == secret
    with pytest.raises(ValueError, match="whsec_"):
        check_secret("whsec_not base64!!")
    assert display_target("https://h.example/p/q?token=s3cr3t#x") == "https://h.example/p/q"
    assert json.loads(event_body("evt_1", "batch.failed", 5, "batch_1"))["type"] == "batch.failed"
