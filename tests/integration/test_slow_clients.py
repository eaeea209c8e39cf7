"""Slow and greedy clients against a live API-only server (no engine): header and body
read timeouts and the per-client connection cap (``vllm_batch/api/connections.py``).

Connection handling does not depend on the database: these run on SQLite only.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import TINY_NAME, LiveServer, LoopThread, api_only_server, free_port
from tests.helpers import chat_line, jsonl

LORIS = 300
HEADER_TIMEOUT = BODY_TIMEOUT = 1.0
SLACK = 3.0  # scheduling delay allowed on a loaded 2-core machine
BOUNDARY = "slowboundary"


@pytest.fixture(scope="module")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('db') / 'test.db'}"


@pytest.fixture(scope="module")
def guarded(
    loop_thread: LoopThread,
    tiny_model: Path,
    sqlite_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    """Short read timeouts, no per-client cap (every test client is 127.0.0.1)."""
    yield from api_only_server(
        loop_thread,
        tiny_model,
        sqlite_url,
        tmp_path_factory,
        header_timeout=HEADER_TIMEOUT,
        body_timeout=BODY_TIMEOUT,
        max_connections_per_client=0,
    )


@pytest.fixture(scope="module")
def capped(
    loop_thread: LoopThread,
    tiny_model: Path,
    sqlite_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    yield from api_only_server(
        loop_thread, tiny_model, sqlite_url, tmp_path_factory, max_connections_per_client=4
    )


@pytest.fixture(scope="module", autouse=True)
def enough_file_descriptors() -> None:
    """300 client sockets and the in-process server's 300 need more than a default 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * LORIS + 256
    if soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(hard, max(need, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= need, (
        f"this test needs {need} file descriptors (ulimit -n); the hard limit is {hard}"
    )


def _port(server: LiveServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


@dataclass
class Conn:
    sock: socket.socket
    opened: float
    closed: float | None = None
    received: bytes = b""
    reset: bool = False

    @property
    def lifetime(self) -> float:
        assert self.closed is not None
        return self.closed - self.opened


class Trickler:
    """Raw connections that send ``head``, then ``drip`` every ``every`` seconds, forever;
    a thread records when the server closes each one and what it answered."""

    def __init__(self, port: int, count: int, head: bytes, drip: bytes, every: float) -> None:
        self.conns: list[Conn] = []
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(head)
            sock.setblocking(False)
            self.conns.append(Conn(sock, time.monotonic()))
        self.drip, self.every = drip, every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            for conn in self.conns:
                selector.register(conn.sock, selectors.EVENT_READ, conn)
            next_drip = time.monotonic() + self.every
            while not self.stop.is_set() and selector.get_map():
                for key, _ in selector.select(0.02):
                    conn = key.data
                    try:
                        data = conn.sock.recv(65536)
                    except OSError:
                        data, conn.reset = b"", True
                    conn.received += data
                    if not data:
                        conn.closed = time.monotonic()
                        selector.unregister(conn.sock)
                        conn.sock.close()
                if time.monotonic() >= next_drip:
                    next_drip += self.every
                    for key in list(selector.get_map().values()):
                        with contextlib.suppress(OSError):  # the read side sees the close
                            key.fileobj.send(self.drip)  # type: ignore[union-attr]

    def open_count(self) -> int:
        return sum(conn.closed is None for conn in self.conns)

    def wait_closed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.open_count() and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for conn in self.conns:
            conn.sock.close()


def _answer(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_slowloris_connections_are_closed_while_others_are_answered(guarded: LiveServer) -> None:
    port = _port(guarded)
    with httpx.Client(base_url=guarded.url, timeout=10) as client:
        before = [_timed(client, "/v1/files") for _ in range(20)]
        head = b"GET /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        loris = Trickler(port, LORIS, head, b"X-Slow: 1\r\n", every=0.2)
        try:
            during: list[float] = []
            # While the attack lasts: from the first connection until the last is closed
            # (the first ones close a header timeout after they opened, maybe before the
            # last of the 300 opened on a loaded machine).
            while loris.open_count() and len(during) < 200:
                during.append(_timed(client, "/v1/files"))  # a kept-alive connection
                during.append(_timed(httpx, guarded.url + "/v1/files"))  # a new one each time
            loris.wait_closed(HEADER_TIMEOUT + SLACK + 5)
        finally:
            loris.close()
    assert loris.open_count() == 0, f"{loris.open_count()} slowloris connections still open"
    lifetimes = sorted(conn.lifetime for conn in loris.conns)
    assert lifetimes[0] >= HEADER_TIMEOUT - 0.05, lifetimes[0]
    assert lifetimes[-1] <= HEADER_TIMEOUT + SLACK, lifetimes[-1]
    answered = [c for c in loris.conns if not c.reset]
    assert answered, "every connection was reset: no 408 was read"
    for conn in answered:
        status, body = _answer(conn.received)
        assert status == 408 and body["error"]["code"] == "request_timeout", conn.received  # type: ignore[index]
        assert "VLLM_BATCH_HEADER_TIMEOUT" in body["error"]["message"]  # type: ignore[index]
    assert len(during) >= 10, "too few requests made during the attack"
    # Answered throughout; generous bounds (the suite loads the machine): the latency itself
    # is measured in the closing numbers printed below, not asserted tightly here.
    assert statistics.median(during) < 1.0, f"median {statistics.median(during):.3f} s"
    assert max(during) < 5.0, f"a request took {max(during):.3f} s during the attack"
    print(
        f"\n{LORIS} slowloris: closed after {lifetimes[0]:.2f}-{lifetimes[-1]:.2f} s "
        f"({len(answered)} read the 408); GET /v1/files before: p50 "
        f"{statistics.median(before) * 1000:.1f} ms, max {max(before) * 1000:.1f} ms; during "
        f"({len(during)}): p50 {statistics.median(during) * 1000:.1f} ms, "
        f"max {max(during) * 1000:.1f} ms"
    )


def test_a_kept_alive_connection_trickling_its_next_request_is_closed(
    guarded: LiveServer,
) -> None:
    """The header clock also runs for the second request on a connection, from its first
    byte; the idle time before it is uvicorn's keep-alive timeout (5 s) and not counted."""
    first = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", _port(guarded)), timeout=10) as sock:
        sock.sendall(first)
        answer = b""
        while not answer.endswith(b"}"):  # /health's JSON, after the status and headers
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        time.sleep(HEADER_TIMEOUT * 1.5)  # idle, kept alive: longer than the header timeout
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        started = time.monotonic()
        received, closed = b"", False
        sock.settimeout(0.2)
        while not closed:
            assert time.monotonic() - started < HEADER_TIMEOUT + SLACK, "never closed"
            try:
                chunk = sock.recv(65536)
            except TimeoutError:  # nothing from the server yet: trickle one more header
                with contextlib.suppress(OSError):
                    sock.sendall(b"X-Slow: 1\r\n")
                continue
            except OSError:
                chunk = b""
            received += chunk
            closed = not chunk
        lifetime = time.monotonic() - started
    assert HEADER_TIMEOUT - 0.05 <= lifetime <= HEADER_TIMEOUT + SLACK, lifetime
    assert received.startswith(b"HTTP/1.1 408"), received


def _timed(client: httpx.Client | object, url: str) -> float:
    started = time.monotonic()
    response = client.get(url, timeout=10)  # type: ignore[attr-defined]
    assert response.status_code == 200, response.text
    return time.monotonic() - started


def _upload_head(length: int) -> bytes:
    return (
        "POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def _multipart(content: bytes) -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; "
            'name="file"; filename="in.jsonl"\r\nContent-Type: application/jsonl\r\n\r\n'
        ).encode()
        + content
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


@pytest.mark.parametrize("drip", [b"", b"-"], ids=["stalled", "trickled"])
def test_a_slow_body_is_cut_off_by_the_body_timeout(guarded: LiveServer, drip: bytes) -> None:
    body = _multipart(jsonl([chat_line(0, TINY_NAME)]))
    before = len(httpx.get(guarded.url + "/v1/files").json()["data"])
    slow = Trickler(_port(guarded), 1, _upload_head(len(body) + 100) + body[:300], drip, 0.1)
    try:
        slow.wait_closed(BODY_TIMEOUT + SLACK + 5)
    finally:
        slow.close()
    [conn] = slow.conns
    assert conn.closed is not None, "the slow upload's connection is still open"
    assert BODY_TIMEOUT - 0.05 <= conn.lifetime <= BODY_TIMEOUT + SLACK, conn.lifetime
    if not conn.reset:
        status, error = _answer(conn.received)
        assert status == 408 and error["error"]["code"] == "request_timeout", conn.received  # type: ignore[index]
        assert "VLLM_BATCH_BODY_TIMEOUT" in error["error"]["message"]  # type: ignore[index]
    assert len(httpx.get(guarded.url + "/v1/files").json()["data"]) == before  # nothing stored


def test_a_steady_upload_longer_than_the_body_timeout_succeeds(guarded: LiveServer) -> None:
    content = jsonl([chat_line(i, TINY_NAME) for i in range(1200)])
    body = _multipart(content)
    assert len(body) > 200_000
    piece = 16 * 1024

    def pieces() -> Iterator[bytes]:
        for start in range(0, len(body), piece):
            time.sleep(0.2)  # well under the 1 s timeout, but > 2 s for the whole body
            yield body[start : start + piece]

    started = time.monotonic()
    response = httpx.post(
        guarded.url + "/v1/files",
        content=pieces(),
        headers={
            "content-type": f"multipart/form-data; boundary={BOUNDARY}",
            "content-length": str(len(body)),
        },
        timeout=30,
    )
    took = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert response.json()["bytes"] == len(content)
    assert took > 2 * BODY_TIMEOUT, took


def test_connections_over_the_per_client_cap_get_a_429(capped: LiveServer) -> None:
    port = _port(capped)
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    try:
        deadline = time.monotonic() + 10
        while (over := httpx.get(capped.url + "/health")).status_code != 429:
            assert time.monotonic() < deadline, "the fifth connection was never refused"
            time.sleep(0.05)  # the server may not have seen all four yet
        assert over.json()["error"]["code"] == "too_many_connections"
        assert over.headers["connection"] == "close" and over.headers["retry-after"] == "1"
        other = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"))
        with other:  # another client address is not affected
            assert other.get(capped.url + "/health").status_code == 200
        idle.pop().close()
        deadline = time.monotonic() + 10
        while httpx.get(capped.url + "/health").status_code != 200:
            assert time.monotonic() < deadline, "a freed connection slot was not reusable"
            time.sleep(0.05)
    finally:
        for sock in idle:
            sock.close()


def test_serve_closes_a_slow_header_connection(tiny_model: Path, tmp_path: Path) -> None:
    """``vllm-batch serve`` (its own process) runs with the connection guard too."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.getcwd(),
        "VLLM_BATCH_HEADER_TIMEOUT": "1",
        "VLLM_BATCH_MAX_CONNECTIONS_PER_CLIENT": "3",
    }
    command = [sys.executable, "-m", "vllm_batch.cli", "serve", "--no-worker"]
    command += ["--port", str(port), "--data-dir", str(tmp_path / "data")]
    command += ["--model", f"{TINY_NAME}={tiny_model}"]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(0.2)
        slow = Trickler(port, 3, b"GET /health HTTP/1.1\r\n", b"X-Slow: 1\r\n", every=0.2)
        try:
            assert httpx.get(url + "/health").status_code == 429  # 3 open: the cap
            slow.wait_closed(1 + SLACK + 5)
        finally:
            slow.close()
        assert slow.open_count() == 0, "serve kept the slow connections open"
        assert all(1 - 0.05 <= conn.lifetime <= 1 + SLACK for conn in slow.conns)
        assert httpx.get(url + "/health").status_code == 200
    finally:
        process.terminate()
        process.wait(30)
