"""Locust load: each user uploads a small batch file, creates a batch, polls it every
second until it ends, then downloads its output; and again, until the run ends.

Environment: ``LOAD_API_KEYS`` (comma-separated; users take them round-robin, none: no
auth header), ``LOAD_LINES`` (lines per file, default 2), ``LOAD_MODEL`` (the served model
name), ``LOAD_SUMMARY`` (a JSON file written at the end: 5xx and connection-error counts).
Run headless on loopback, e.g. (``benchmarks/load/bench_load.py`` does all of it):

    locust -f benchmarks/load/locustfile.py --headless -u 40 -r 10 -t 2m \\
        --host http://127.0.0.1:4080 --csv out/load
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections import Counter
from typing import Any

from locust import HttpUser, between, events, task
from locust.env import Environment

KEYS = [key for key in os.environ.get("LOAD_API_KEYS", "").split(",") if key]
LINES = int(os.environ.get("LOAD_LINES", "2"))
MODEL = os.environ.get("LOAD_MODEL", "tiny")
TERMINAL = {"completed", "failed", "cancelled", "expired"}
POLL_SECONDS = 1.0
POLL_LIMIT_SECONDS = 600.0
_next_key = itertools.count()
COUNTS: Counter[str] = Counter()
"""``5xx``, ``connection_errors``, ``batches_completed``, ``batches_not_completed``."""


def batch_file(user: int, round_: int) -> bytes:
    lines = [
        {
            "custom_id": f"u{user}-r{round_}-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"Count to {i}."}],
                "max_tokens": 4,
                "temperature": 0,
            },
        }
        for i in range(LINES)
    ]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


@events.request.add_listener
def _count(response: Any = None, exception: BaseException | None = None, **_kwargs: Any) -> None:
    status = getattr(response, "status_code", 0) or 0
    if status >= 500:
        COUNTS["5xx"] += 1
    elif exception is not None and status == 0:  # no HTTP answer: refused, reset, timed out
        COUNTS["connection_errors"] += 1


@events.quitting.add_listener
def _write_summary(environment: Environment, **_kwargs: Any) -> None:
    path = os.environ.get("LOAD_SUMMARY")
    if path:
        with open(path, "w") as out:
            json.dump(dict(COUNTS), out)


class BatchUser(HttpUser):
    """upload → create → poll every second → download, repeated."""

    wait_time = between(0.0, 0.5)

    def on_start(self) -> None:
        self.number = next(_next_key)
        self.rounds = 0
        if KEYS:
            self.client.headers["Authorization"] = f"Bearer {KEYS[self.number % len(KEYS)]}"

    @task
    def batch_round(self) -> None:
        self.rounds += 1
        with self.client.post(
            "/v1/files",
            files={"file": ("in.jsonl", batch_file(self.number, self.rounds))},
            data={"purpose": "batch"},
            name="POST /v1/files",
            catch_response=True,
        ) as upload:
            if upload.status_code != 200:
                upload.failure(f"upload: {upload.status_code}")
                return
        with self.client.post(
            "/v1/batches",
            json={
                "input_file_id": upload.json()["id"],
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
            name="POST /v1/batches",
            catch_response=True,
        ) as created:
            if created.status_code != 200:
                created.failure(f"create: {created.status_code}")
                return
        batch_id = created.json()["id"]
        deadline = time.monotonic() + POLL_LIMIT_SECONDS
        batch: dict[str, Any] = {}
        while time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
            with self.client.get(
                f"/v1/batches/{batch_id}", name="GET /v1/batches/{id}", catch_response=True
            ) as polled:
                if polled.status_code != 200:
                    polled.failure(f"poll: {polled.status_code}")
                    continue
                batch = polled.json()
            if batch["status"] in TERMINAL:
                break
        if batch.get("status") != "completed" or not batch.get("output_file_id"):
            COUNTS["batches_not_completed"] += 1
            return
        with self.client.get(
            f"/v1/files/{batch['output_file_id']}/content",
            name="GET /v1/files/{id}/content",
            catch_response=True,
        ) as output:
            lines = output.text.count("\n") if output.status_code == 200 else -1
            if lines != LINES:
                output.failure(f"download: {output.status_code}, {lines} lines")
                return
        COUNTS["batches_completed"] += 1
