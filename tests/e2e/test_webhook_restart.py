"""A webhook delivery survives ``kill -9`` of the server between two attempts."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
from openai import OpenAI
from standardwebhooks import Webhook

from tests.e2e.conftest import spawn_server, stop_server
from tests.helpers import jsonl, wait_for_batch
from tests.webhook_receiver import webhook_receiver
from vllm_batch.protocol.webhook_event import new_secret


def test_delivery_resumes_after_kill_between_attempts(tmp_path: Path) -> None:
    secret = new_secret()
    env = {
        "VLLM_BATCH_WEBHOOK_SECRET": secret,
        "VLLM_BATCH_WEBHOOK_ALLOWED_HOSTS": "127.0.0.2",
        "VLLM_BATCH_DELIVERY_BACKOFF_BASE": "4",  # first retry 2-4 s after the failure
        "VLLM_BATCH_DELIVERY_POLL_INTERVAL": "0.1",
    }
    with webhook_receiver("127.0.0.2") as receiver:
        hook = receiver.script("/hook", 500, 200)
        server = spawn_server(["--no-worker"], tmp_path, env=env, wait_engine=False)
        try:
            client = OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
            upload = client.files.create(
                file=("in.jsonl", jsonl([{"custom_id": "not-a-request"}])), purpose="batch"
            )
            batch = client.batches.create(
                input_file_id=upload.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                metadata={"webhook_url": hook},
            )
            assert wait_for_batch(client, batch.id, timeout=30).status == "failed"
            receiver.wait_for("/hook", 1, timeout=30)
            url = f"{server.base_url}/batches/{batch.id}/deliveries"
            deadline = time.monotonic() + 10
            while httpx.get(url).json()["data"][0]["attempts"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        finally:
            stop_server(server, signal.SIGKILL)
        killed_at = time.time()
        time.sleep(1)
        assert len(receiver.at("/hook")) == 1  # the retry was not sent before the kill

        restarted = spawn_server(["--no-worker"], tmp_path, env=env, wait_engine=False)
        try:
            first, second = receiver.wait_for("/hook", 2, timeout=60)
            assert second.at > killed_at
            assert first.headers["webhook-id"] == second.headers["webhook-id"]
            event = Webhook(secret).verify(second.body, second.headers)
            assert event["type"] == "batch.failed" and event["data"] == {"id": batch.id}
            delivery = httpx.get(f"{restarted.base_url}/batches/{batch.id}/deliveries").json()
            [row] = delivery["data"]
            deadline = time.monotonic() + 10
            while row["status"] == "pending" and time.monotonic() < deadline:
                time.sleep(0.1)
                [row] = httpx.get(f"{restarted.base_url}/batches/{batch.id}/deliveries").json()[
                    "data"
                ]
            assert row["status"] == "succeeded" and row["attempts"] == 2
            assert [(a["status_code"], a["ok"]) for a in row["history"]] == [
                (500, False),
                (200, True),
            ]
            time.sleep(1)
            assert len(receiver.at("/hook")) == 2  # delivered once, not again
        finally:
            stop_server(restarted)
