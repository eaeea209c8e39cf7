"""Huge bodies against a real ``vllm-batch serve`` process: refused without being read.

The server runs in its own process (``serve --no-worker --api-key-file``) with its own
data and temp directories, so its RSS and disk use can be measured; its output must
never contain the API key.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import free_port

KEY = "sk-flood-secret-0123456789"
MB = 1024 * 1024
BOUNDARY = "floodboundary"
MAX_GROWTH = 20 * MB


@dataclass
class ServeProcess:
    url: str
    process: subprocess.Popen[bytes]
    data_dir: Path
    tmp_dir: Path
    log: Path

    @property
    def rss(self) -> int:
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def disk(self) -> int:
        return sum(
            p.stat().st_size
            for folder in (self.data_dir, self.tmp_dir)
            for p in folder.rglob("*")
            if p.is_file()
        )


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    root = tmp_path_factory.mktemp("flood")
    key_file = root / "key.txt"
    key_file.write_text(f"  {KEY}\n")
    (root / "tmp").mkdir()
    port = free_port()
    env = {**os.environ, "TMPDIR": str(root / "tmp"), "PYTHONPATH": os.getcwd()}
    env.pop("VLLM_BATCH_API_KEY", None)
    log = root / "serve.log"
    command = [sys.executable, "-m", "vllm_batch.cli", "serve", "--no-worker", "--port", str(port)]
    command += ["--data-dir", str(root / "data"), "--api-key-file", str(key_file)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "serve did not start"
        time.sleep(0.2)
    yield ServeProcess(url, process, root / "data", root / "tmp", log)
    process.terminate()
    process.wait(30)
    output = log.read_text()
    assert KEY not in output, "the API key was printed"
    assert "<your key>" in output  # the banner's placeholder (JSON-escaped in JSON logs)


class Zeros:
    """``total`` bytes streamed in 1 MB pieces, counting how many the client got to send."""

    def __init__(self, total: int, head: bytes = b"") -> None:
        self.total, self.head, self.sent = total, head, 0

    def __iter__(self) -> Iterator[bytes]:
        if self.head:
            yield self.head
        block = b"0" * MB
        for _ in range(self.total // MB):
            self.sent += MB
            yield block


def post(url: str, body: Zeros, headers: dict[str, str]) -> httpx.Response | None:
    """POST a streamed body; None if the server closed before httpx saw a response."""
    try:
        return httpx.post(url, content=iter(body), headers=headers, timeout=120)
    except (httpx.RemoteProtocolError, httpx.WriteError, httpx.ReadError):
        return None


def test_huge_bodies_are_never_read(serve: ServeProcess) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{serve.url}/v1/files", headers=auth).status_code == 200
    rss, disk = serve.rss, serve.disk()
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n'
        "\r\n"
    ).encode()
    started = time.monotonic()

    # 200 MB of JSON announced by Content-Length, no key: 401 before one byte is read.
    bodies = [Zeros(200 * MB), Zeros(140 * MB, head), Zeros(200 * MB), Zeros(200 * MB)]
    json_post = post(
        f"{serve.url}/v1/batches",
        bodies[0],
        {"Content-Length": str(200 * MB), "Content-Type": "application/json"},
    )
    # 140 MB chunked multipart upload, no key.
    upload = post(
        f"{serve.url}/v1/files",
        bodies[1],
        {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
    )
    # 200 MB announced to a JSON route with the key: over the 1 MiB cap, refused at once.
    too_big = post(
        f"{serve.url}/v1/batches",
        bodies[2],
        {**auth, "Content-Length": str(200 * MB), "Content-Type": "application/json"},
    )
    # 200 MB chunked JSON with the key: cut off after 1 MiB.
    chunked = post(
        f"{serve.url}/v1/batches", bodies[3], {**auth, "Content-Type": "application/json"}
    )
    elapsed = time.monotonic() - started

    statuses = [r.status_code if r is not None else None for r in (json_post, upload)]
    assert statuses == [401, 401], statuses
    assert [r.status_code if r is not None else None for r in (too_big, chunked)] == [413, 413]
    for response in (json_post, upload, too_big, chunked):
        assert response is not None and set(response.json()["error"]) == {
            "message",
            "type",
            "param",
            "code",
        }
    # The server closed each connection early: the client never got to send most bytes.
    assert all(body.sent < MAX_GROWTH for body in bodies), [body.sent for body in bodies]
    assert serve.rss - rss < MAX_GROWTH, (rss, serve.rss)
    assert serve.disk() - disk < MAX_GROWTH
    assert httpx.get(f"{serve.url}/v1/files", headers=auth).json()["data"] == []
    assert elapsed < 60
