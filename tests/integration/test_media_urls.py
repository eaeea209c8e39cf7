"""Media URLs in chat lines, through the real server and the tiny engine (issue 22).

A line whose ``image_url`` (or ``video_url``) targets a loopback, private or metadata
address is an error line with code ``url_not_allowed`` and is never run: a recording HTTP
server on loopback sees no request. The other lines of the batch run normally; an allowed
image on the text-only tiny model keeps the engine's own answer. SQLite only: the guard has
no database code.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import database
from tests.helpers import results, submit, wait_for_batch

PNG = "data:image/png;base64,iVBORw0KGgo="


@pytest.fixture(scope="module")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SQLite only (the guard runs in the database-free pipeline)."""
    with database("sqlite", tmp_path_factory.mktemp("db") / "test.db") as url:
        yield url


class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every GET with a tiny PNG and records its path."""

    seen: list[str] = []

    def do_GET(self) -> None:
        self.seen.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(b"\x89PNG\r\n\x1a\n")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[str]]]:
    """A plain HTTP server on 127.0.0.1: its base URL and the paths it was asked for."""
    seen: list[str] = []
    handler = type("Handler", (Recorder,), {"seen": seen})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def chat_line(custom_id: str, model: str, *parts: dict[str, Any]) -> dict[str, Any]:
    content: Any = [{"type": "text", "text": "Describe it."}, *parts] if parts else "Hi there"
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def test_private_media_urls_are_error_lines_and_never_fetched(
    client: Any, server: Any, recorder: tuple[str, list[str]]
) -> None:
    base, seen = recorder
    model = server.settings.model_specs[0].name
    lines = [
        chat_line("text", model),
        chat_line("loopback", model, image(f"{base}/cat.png")),
        chat_line("metadata", model, image("http://169.254.169.254/latest/meta-data/")),
        chat_line("private", model, image("http://10.0.0.1/cat.png")),
        chat_line("video", model, {"type": "video_url", "video_url": {"url": f"{base}/v.mp4"}}),
        chat_line("data", model, image(PNG)),
    ]
    batch = wait_for_batch(client, submit(client, lines, "/v1/chat/completions").id)
    assert batch.status == "completed"
    out, errors = results(client, batch.output_file_id), results(client, batch.error_file_id)
    assert set(out) == {"text"} and out["text"]["response"]["status_code"] == 200
    why = {
        "loopback": "loopback address: 127.0.0.1",
        "metadata": "cloud metadata service address: 169.254.169.254",
        "private": "private address: 10.0.0.1",
        "video": "loopback address: 127.0.0.1",
    }
    for custom_id, reason in why.items():
        error = errors[custom_id]["error"]
        assert error["code"] == "url_not_allowed", error
        part = "video_url" if custom_id == "video" else "image_url"
        assert error["message"].startswith(f"messages[0].content[1].{part}.url: ")
        assert reason in error["message"] and "VLLM_BATCH_MEDIA_ALLOWED_HOSTS" in error["message"]
        assert errors[custom_id]["response"]["status_code"] == 400
    # A data: image passes the guard: the text-only engine answers as it did before.
    assert errors["data"]["error"]["code"] == "invalid_request_error"
    assert "not a multimodal model" in errors["data"]["error"]["message"]
    assert seen == []
