"""The docs' webhook receiver (docs/webhooks.md), run as written, accepts our events and
rejects forgeries."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.doc_blocks import blocks_run_by
from vllm_batch.protocol.webhook_event import event_body, new_secret, signed_headers

THIS = "tests/unit/test_readme_webhook_receiver.py"


def receiver_snippet() -> str:
    [block] = blocks_run_by(THIS, "python")
    assert "webhooks.unwrap" in block.code and "FastAPI" in block.code
    return block.code


def test_readme_receiver_verifies_signed_events(capsys: pytest.CaptureFixture[str]) -> None:
    import datetime as dt

    secret = new_secret()
    code = receiver_snippet().replace('SECRET = "whsec_..."', f"SECRET = {secret!r}")
    scope: dict[str, Any] = {}
    exec(compile(code, "docs/webhooks.md", "exec"), scope)
    client = TestClient(scope["app"], raise_server_exceptions=False)
    body = event_body("evt_1", "batch.completed", 1, "batch_9")
    headers = signed_headers(secret, "evt_1", body, dt.datetime.now(tz=dt.UTC))
    assert client.post("/hook", content=body, headers=headers).status_code == 200
    assert client.post("/hook", content=body, headers=headers).status_code == 200  # a retry
    assert capsys.readouterr().out == "done: batch_9 batch_9\n"
    forged = signed_headers(new_secret(), "evt_1", body, dt.datetime.now(tz=dt.UTC))
    assert client.post("/hook", content=body, headers=forged).status_code == 500
