"""BENCHMARK ONLY: simulated GPU servers for the remote engine's benchmarks. Never an engine.

Each port is one "upstream" that speaks just enough of the OpenAI API: ``GET /v1/models``
lists ``--model``, and a POST to ``/v1/chat/completions`` or ``/v1/completions`` holds one
of ``--concurrency`` slots for ``--latency`` seconds (requests past that wait in line, as a
GPU server queues them), then answers a tiny completion with fixed usage. ``--max-queue``
answers 429 (``Retry-After: 1``) when that many requests already wait, like a router's
admission control. ``GET /stats`` returns the port's counters. No inference, almost no CPU:
many simulated GPUs fit on 2 cores.

    python benchmarks/sim_upstream.py --ports 9001,9002 --latency 1.0 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field


@dataclass
class SimUpstream:
    """One simulated server's state and counters."""

    model: str
    latency: float
    concurrency: int
    max_queue: int | None
    slots: asyncio.Semaphore = field(init=False)
    waiting: int = 0
    running: int = 0
    served: int = 0
    throttled: int = 0
    peak_running: int = 0
    peak_waiting: int = 0

    def __post_init__(self) -> None:
        self.slots = asyncio.Semaphore(self.concurrency)

    async def complete(self, body: bytes) -> tuple[int, bytes]:
        if self.max_queue is not None and self.waiting >= self.max_queue:
            self.throttled += 1
            return 429, b'{"error":{"message":"queue full","type":"RateLimitError","code":429}}'
        self.waiting += 1
        self.peak_waiting = max(self.peak_waiting, self.waiting)
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        self.peak_running = max(self.peak_running, self.running)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
        finally:
            self.running -= 1
            self.slots.release()
        self.served += 1
        answer = {
            "id": f"sim-{self.served}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "simulated"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 16, "total_tokens": 26},
        }
        return 200, json.dumps(answer, separators=(",", ":")).encode()

    def stats(self) -> dict[str, int]:
        return {
            "served": self.served,
            "throttled": self.throttled,
            "running": self.running,
            "waiting": self.waiting,
            "peak_running": self.peak_running,
            "peak_waiting": self.peak_waiting,
        }


REASONS = {200: "OK", 404: "Not Found", 429: "Too Many Requests"}


async def handle(
    sim: SimUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """HTTP/1.1 with keep-alive: one request after another on the connection."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":", 1)[1])
            body = await reader.readexactly(length) if length else b""
            status, payload, extra = 404, b'{"error":{"message":"not found"}}', ""
            if method == "GET" and path.endswith("/models"):
                data = {"object": "list", "data": [{"id": sim.model, "object": "model"}]}
                status, payload = 200, json.dumps(data).encode()
            elif method == "GET" and path == "/stats":
                status, payload = 200, json.dumps(sim.stats()).encode()
            elif method == "POST" and path.endswith("completions"):
                status, payload = await sim.complete(body)
                if status == 429:
                    extra = "Retry-After: 1\r\n"
            writer.write(
                f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                f"{extra}\r\n".encode()
                + payload
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def serve(args: argparse.Namespace) -> None:
    servers = []
    for port in args.ports:
        sim = SimUpstream(args.model, args.latency, args.concurrency, args.max_queue)

        async def on_connect(
            r: asyncio.StreamReader, w: asyncio.StreamWriter, sim: SimUpstream = sim
        ) -> None:
            await handle(sim, r, w)

        servers.append(await asyncio.start_server(on_connect, "127.0.0.1", port, backlog=1024))
    print(f"simulated upstreams on ports {', '.join(map(str, args.ports))}", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--ports", required=True, type=lambda s: [int(p) for p in s.split(",") if p]
    )
    parser.add_argument("--model", default="bench-model")
    parser.add_argument("--latency", type=float, default=1.0, help="seconds per request")
    parser.add_argument("--concurrency", type=int, default=16, help="requests served at once")
    parser.add_argument("--max-queue", type=int, help="answer 429 when this many wait")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
