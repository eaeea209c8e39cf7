"""A real HTTP webhook receiver on loopback (a thread of this process) for tests.

Each path gets a script of status codes (the last one repeats); every request is kept.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    url: str
    requests: list[Received] = field(default_factory=list)
    scripts: dict[str, list[int]] = field(default_factory=dict)
    extra_headers: dict[str, dict[str, str]] = field(default_factory=dict)
    response_bytes: dict[str, int] = field(default_factory=dict)
    delay: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def script(self, path: str, *codes: int) -> str:
        """Answer ``path`` with ``codes`` in turn (the last repeats); returns its full URL."""
        self.scripts[path] = list(codes)
        return self.url + path

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def wait_for(self, path: str, count: int, timeout: float = 60) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.at(path)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path}: {len(self.at(path))} of {count} requests")
            time.sleep(0.05)
        return self.at(path)


@contextlib.contextmanager
def webhook_receiver(host: str = "127.0.0.1") -> Iterator[Receiver]:
    receiver: Receiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length)
            path = self.path
            with receiver.lock:
                receiver.requests.append(
                    Received(
                        path, {k.lower(): v for k, v in self.headers.items()}, body, time.time()
                    )
                )
                script = receiver.scripts.get(path, [200])
                code = script.pop(0) if len(script) > 1 else script[0]
            time.sleep(receiver.delay.get(path, 0))
            self.send_response(code)
            for name, value in receiver.extra_headers.get(path, {}).items():
                self.send_header(name, value)
            size = receiver.response_bytes.get(path, 2)
            self.send_header("content-length", str(size))
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(b"x" * size)

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer((host, 0), Handler)
    server.daemon_threads = True
    receiver = Receiver(url=f"http://{host}:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
