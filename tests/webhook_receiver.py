"""A real HTTP server on loopback (a thread of this process) for tests: a webhook receiver
that also serves files.

POST: each path gets a script of status codes (the last one repeats); every request is kept.
GET: ``serve`` a path's bytes (optionally dripped slowly, or without ``Content-Length``),
or ``redirect`` it elsewhere; anything else is a 404.
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
    files: dict[str, bytes] = field(default_factory=dict)
    drips: dict[str, float] = field(default_factory=dict)
    unsized: set[str] = field(default_factory=set)
    redirects: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def script(self, path: str, *codes: int) -> str:
        """Answer ``path`` with ``codes`` in turn (the last repeats); returns its full URL."""
        self.scripts[path] = list(codes)
        return self.url + path

    def serve(self, path: str, data: bytes, *, drip: float = 0, sized: bool = True) -> str:
        """Answer GET ``path`` with ``data``, in ten pieces over ``drip`` seconds (``sized``:
        with a ``Content-Length``, else until the connection closes); returns its URL."""
        self.files[path] = data
        self.drips[path] = drip
        if not sized:
            self.unsized.add(path)
        return self.url + path

    def redirect(self, path: str, location: str) -> str:
        """Answer GET ``path`` with a 302 to ``location``; returns its full URL."""
        self.redirects[path] = location
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

        def do_GET(self) -> None:
            path = self.path
            with receiver.lock:
                receiver.requests.append(Received(path, dict(self.headers), b"", time.time()))
            if path in receiver.redirects:
                self.send_response(302)
                self.send_header("location", receiver.redirects[path])
                self.send_header("content-length", "0")
                self.end_headers()
                return
            data = receiver.files.get(path, b"")
            self.send_response(200 if path in receiver.files else 404)
            if path in receiver.unsized:
                self.send_header("connection", "close")
                self.close_connection = True
            else:
                self.send_header("content-length", str(len(data)))
            self.end_headers()
            step = -(-len(data) // 10) or 1
            with contextlib.suppress(OSError):
                for start in range(0, len(data), step):
                    time.sleep(receiver.drips.get(path, 0) / 10)
                    self.wfile.write(data[start : start + step])
                    self.wfile.flush()

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


@dataclass
class SilentReceiver:
    """A TCP listener that accepts connections and never reads or answers (a hung host)."""

    url: str
    accepted: list[float] = field(default_factory=list)
    """When each connection was accepted."""
    open_now: int = 0
    peak: int = 0
    """The most connections held open at once."""
    lock: threading.Lock = field(default_factory=threading.Lock)


@contextlib.contextmanager
def silent_receiver(host: str = "127.0.0.1") -> Iterator[SilentReceiver]:
    """Accept every connection on ``host``, read what comes and never answer, until the
    block ends (a receiver that hangs; the client's timeout ends each attempt)."""
    import selectors
    import socket

    listener = socket.create_server((host, 0), backlog=128)
    listener.setblocking(False)
    receiver = SilentReceiver(url=f"http://{host}:{listener.getsockname()[1]}")
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            while not stop.is_set():
                for key, _ in selector.select(0.05):
                    if key.fileobj is listener:
                        conn, _ = listener.accept()
                        held.append(conn)
                        selector.register(conn, selectors.EVENT_READ)
                        with receiver.lock:
                            receiver.accepted.append(time.time())
                            receiver.open_now += 1
                            receiver.peak = max(receiver.peak, receiver.open_now)
                        continue
                    conn = key.fileobj  # type: ignore[assignment]
                    try:  # read the request and drop it: no answer ever comes
                        closed = conn.recv(65536) == b""
                    except OSError:
                        closed = True
                    if closed:
                        selector.unregister(conn)
                        conn.close()
                        with receiver.lock:
                            receiver.open_now -= 1

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()
