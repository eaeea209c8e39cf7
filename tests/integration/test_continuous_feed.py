"""A worker holding several chunks of several batches at once, on the real tiny engine:
the engine is shared across chunk and batch boundaries, a small batch does not wait for a
large one, and cancel, expiry and a lost lease keep every line exactly once (SQLite and
PostgreSQL; chunks of 16 lines)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI
from sqlalchemy import select, update

from tests.conftest import TINY_NAME, LiveServer
from tests.helpers import chat_line, jsonl, parse_jsonl, wait_for_batch
from vllm_batch.batches.store.rows import BatchRow, ChunkRow


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as c:
        yield c


def submit(client: OpenAI, prefix: str, n: int, max_tokens: int, window: str = "24h") -> str:
    lines = [chat_line(i, TINY_NAME, max_tokens=max_tokens, ignore_eos=True) for i in range(n)]
    for line in lines:
        line["custom_id"] = f"{prefix}-{line['custom_id']}"
    upload = client.files.create(file=(f"{prefix}.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window=window,  # type: ignore[arg-type]
    ).id


class HeldSampler:
    """Samples the worker's held chunks (in the server's loop) until stopped."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self.samples: list[list[tuple[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        worker = self.server.app.state.ctx.worker

        async def held() -> list[tuple[str, str]]:
            return [(h.run.chunk.batch_id, h.run.chunk.id) for h in worker.held.values()]

        while not self._stop.is_set():
            self.samples.append(self.server.loop_thread.run(held()))
            time.sleep(0.05)

    def __enter__(self) -> HeldSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def most_chunks(self) -> int:
        return max((len(sample) for sample in self.samples), default=0)

    def most_batches(self) -> int:
        return max((len({b for b, _ in sample}) for sample in self.samples), default=0)


def outputs(client: OpenAI, batch: Any) -> tuple[list[str], list[str]]:
    """Custom ids of the output and error files, in file order."""
    done = errors = []
    if batch.output_file_id:
        done = [
            r["custom_id"] for r in parse_jsonl(client.files.content(batch.output_file_id).text)
        ]
    if batch.error_file_id:
        errors = [
            r["custom_id"] for r in parse_jsonl(client.files.content(batch.error_file_id).text)
        ]
    return done, errors


def assert_complete(client: OpenAI, batch_id: str, prefix: str, n: int) -> None:
    final = wait_for_batch(client, batch_id)
    assert final.status == "completed"
    assert final.request_counts.model_dump() == {"total": n, "completed": n, "failed": 0}
    done, errors = outputs(client, final)
    assert done == [f"{prefix}-request-{i}" for i in range(n)] and errors == []


def wait_progress(client: OpenAI, *batch_ids: str, at_least: int = 1) -> None:
    deadline = time.monotonic() + 120
    while any(client.batches.retrieve(b).request_counts.completed < at_least for b in batch_ids):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_batches_share_the_engine_and_each_line_comes_out_once(
    client: OpenAI, server: LiveServer
) -> None:
    sizes = {"a": 96, "b": 48, "c": 24}
    with HeldSampler(server) as sampler:
        ids = {name: submit(client, name, n, max_tokens=16) for name, n in sizes.items()}
        for name, n in sizes.items():
            assert_complete(client, ids[name], name, n)
    assert sampler.most_chunks() >= 2, sampler.samples
    assert sampler.most_batches() >= 2, sampler.samples


def test_a_small_batch_does_not_wait_for_a_large_one(client: OpenAI) -> None:
    large = submit(client, "large", 2400, max_tokens=48)
    wait_progress(client, large, at_least=16)
    small = submit(client, "small", 16, max_tokens=48)
    assert_complete(client, small, "small", 16)
    assert client.batches.retrieve(large).status == "in_progress"
    client.batches.cancel(large)
    final = wait_for_batch(client, large)
    assert final.status == "cancelled"
    done, errors = outputs(client, final)
    assert len(done) == len(set(done)) == final.request_counts.completed < 2400
    assert errors == []


def test_cancel_one_batch_while_another_runs(client: OpenAI, server: LiveServer) -> None:
    with HeldSampler(server) as sampler:
        doomed = submit(client, "doomed", 400, max_tokens=32)
        kept = submit(client, "kept", 160, max_tokens=32)
        wait_progress(client, doomed, kept)
        client.batches.cancel(doomed)
        final = wait_for_batch(client, doomed)
        assert_complete(client, kept, "kept", 160)
    assert sampler.most_batches() >= 2
    assert final.status == "cancelled"
    done, _ = outputs(client, final)
    assert len(done) == len(set(done)) == final.request_counts.completed
    assert set(done) <= {f"doomed-request-{i}" for i in range(400)}


def test_expiry_of_one_batch_while_another_runs(client: OpenAI, server: LiveServer) -> None:
    short = submit(client, "short", 1000, max_tokens=100, window="1h")
    kept = submit(client, "kept2", 160, max_tokens=32)
    wait_progress(client, short, kept)

    async def expire_now(session: Any) -> None:  # 1h is the shortest window accepted
        async with session.begin():
            await session.execute(
                update(BatchRow).where(BatchRow.id == short).values(expires_at=int(time.time()))
            )

    server.db(expire_now)
    final = wait_for_batch(client, short, timeout=90)
    assert_complete(client, kept, "kept2", 160)
    assert final.status == "expired"
    done, errors = outputs(client, final)
    assert sorted(done + errors) == sorted(f"short-request-{i}" for i in range(1000))
    assert len(errors) == final.request_counts.failed > 0


def test_a_lost_lease_among_several_held_chunks_redoes_only_that_chunk(
    client: OpenAI, server: LiveServer
) -> None:
    worker = server.app.state.ctx.worker
    batch_id = submit(client, "stolen", 320, max_tokens=32)
    deadline = time.monotonic() + 120

    async def held_of_batch() -> list[str]:
        return [cid for cid, h in worker.held.items() if h.run.chunk.batch_id == batch_id]

    while len(held := server.loop_thread.run(held_of_batch())) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    victim = held[-1]

    async def steal(session: Any) -> None:  # another worker took it over after a lapse
        async with session.begin():
            await session.execute(
                update(ChunkRow)
                .where(ChunkRow.id == victim)
                .values(lease_owner="thief/ns/1/x", lease_until=time.time() - 1)
            )

    server.db(steal)
    assert_complete(client, batch_id, "stolen", 320)

    async def attempts(session: Any) -> dict[str, int]:
        rows = await session.execute(
            select(ChunkRow.id, ChunkRow.attempts).where(ChunkRow.batch_id == batch_id)
        )
        return dict(rows.all())

    by_chunk = server.db(attempts)
    assert by_chunk[victim] >= 2  # claimed again after the lease was lost
    assert sum(count > 1 for count in by_chunk.values()) == 1
