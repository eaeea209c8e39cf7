"""Database connection pools (SQLite and PostgreSQL, no engine): no request holds one pooled
connection while it waits for another, API requests and background work have separate
pools, and a request that finds the API pool exhausted gets a 503 in OpenAI's shape."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from tests.conftest import TINY_NAME, LiveServer, LoopThread, api_only_server
from tests.helpers import chat_line, jsonl
from vllm_batch.batches.store import queries

POOL = 2  # API connections: size 2, no overflow
KEYS = {f"team-{n}": f"sk-pool-{n}" for n in range(4)}


@pytest.fixture(scope="module")
def api(
    loop_thread: LoopThread,
    tiny_model: Path,
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    """A tiny API pool with a short wait, per-key ownership on."""
    yield from api_only_server(
        loop_thread,
        tiny_model,
        database_url,
        tmp_path_factory,
        db_pool_size=POOL,
        db_max_overflow=0,
        db_worker_pool_size=3,
        db_worker_max_overflow=0,
        db_pool_timeout=3.0,
        api_keys=[f"{name}:{key}" for name, key in KEYS.items()],
    )


def headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def upload(api: LiveServer, key: str, lines: int = 2) -> str:
    body = jsonl([chat_line(i, TINY_NAME, max_tokens=2) for i in range(lines)])
    response = httpx.post(
        f"{api.base_url}/files",
        headers=headers(key),
        files={"file": ("in.jsonl", body)},
        data={"purpose": "batch"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


async def create_many(api: LiveServer, jobs: list[tuple[str, str]]) -> list[httpx.Response]:
    """``POST /v1/batches`` for every (key, input file) at once."""
    limits = httpx.Limits(max_connections=len(jobs), max_keepalive_connections=len(jobs))
    async with httpx.AsyncClient(base_url=api.base_url, limits=limits, timeout=60) as http:
        return await asyncio.gather(
            *(
                http.post(
                    "/batches",
                    headers=headers(key),
                    json={
                        "input_file_id": file_id,
                        "endpoint": "/v1/chat/completions",
                        "completion_window": "24h",
                    },
                )
                for key, file_id in jobs
            )
        )


def test_creates_beyond_the_pool_size_all_succeed(api: LiveServer) -> None:
    """Eight times as many concurrent creates as the API pool has connections: each create
    holds at most one connection, so none waits for a second (the old deadlock: 500s)."""
    files = {key: upload(api, key) for key in KEYS.values()}
    jobs = [(key, files[key]) for key in KEYS.values() for _ in range(POOL * 2)]
    started = time.monotonic()
    responses = asyncio.run(create_many(api, jobs))
    elapsed = time.monotonic() - started
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * len(jobs), [r.text for r in responses if r.status_code != 200][:3]
    assert elapsed < 3.0, f"{len(jobs)} creates on a {POOL}-connection pool took {elapsed:.1f}s"
    assert len({r.json()["id"] for r in responses}) == len(jobs)


def test_cancel_holds_one_connection_at_a_time(api: LiveServer) -> None:
    """Cancel checks ownership, then cancels: concurrent cancels beyond the pool size."""
    key = KEYS["team-0"]
    file_id = upload(api, key)
    created = asyncio.run(create_many(api, [(key, file_id)] * (POOL * 3)))
    ids = [r.json()["id"] for r in created]

    async def cancel_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as http:
            return await asyncio.gather(
                *(
                    http.post(f"/batches/{batch_id}/cancel", headers=headers(key))
                    for batch_id in ids
                )
            )

    responses = asyncio.run(cancel_all())
    assert [r.status_code for r in responses] == [200] * len(ids), [r.text for r in responses]
    assert {r.json()["status"] for r in responses} <= {"cancelling", "cancelled"}


def test_cancel_and_create_check_ownership(api: LiveServer) -> None:
    """The ownership checks moved with the sessions: another key's file or batch is unknown."""
    mine, theirs = KEYS["team-1"], KEYS["team-2"]
    file_id = upload(api, mine)
    [foreign] = asyncio.run(create_many(api, [(theirs, file_id)]))
    assert foreign.status_code == 404
    assert foreign.json()["error"]["code"] == "not_found"
    [batch] = asyncio.run(create_many(api, [(mine, file_id)]))
    batch_id = batch.json()["id"]
    response = httpx.post(f"{api.base_url}/batches/{batch_id}/cancel", headers=headers(theirs))
    assert response.status_code == 404
    assert response.json()["error"]["message"] == f"No such batch: '{batch_id}'."


def test_wrong_purpose_input_is_refused(api: LiveServer) -> None:
    key = KEYS["team-3"]
    response = httpx.post(
        f"{api.base_url}/files",
        headers=headers(key),
        files={"file": ("notes.txt", b"hello")},
        data={"purpose": "user_data"},
    )
    assert response.status_code == 200, response.text
    file_id = response.json()["id"]
    [refused] = asyncio.run(create_many(api, [(key, file_id)]))
    assert refused.status_code == 400
    assert refused.json()["error"] == {
        "message": f"File {file_id} has purpose 'user_data'; a batch input file must be "
        "uploaded with purpose 'batch'.",
        "type": "invalid_request_error",
        "param": "input_file_id",
        "code": "invalid_value",
    }


@contextlib.asynccontextmanager
async def exhausted(sessions: Any, count: int) -> AsyncIterator[None]:
    """Hold ``count`` connections of ``sessions``' pool until the block ends."""
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(count):
            session = await stack.enter_async_context(sessions())
            await session.execute(text("SELECT 1"))
        yield


def test_saturated_api_pool_answers_503_and_spares_background_work(api: LiveServer) -> None:
    """With every API connection taken, a request gets 503 ``database_busy`` after
    ``db_pool_timeout`` while background work (the worker pool) still reads and writes."""
    ctx = api.app.state.ctx
    key = KEYS["team-0"]
    file_id = upload(api, key)
    released = asyncio.Event()
    holding = asyncio.Event()

    async def hold() -> None:
        async with exhausted(ctx.read_sessions, POOL):
            holding.set()
            await released.wait()

    async def background_work() -> float:
        started = time.monotonic()
        async with ctx.for_work.sessions() as session, session.begin():
            assert await queries.get_file(session, file_id) is not None
        return time.monotonic() - started

    holder = asyncio.run_coroutine_threadsafe(hold(), api.loop_thread.loop)
    try:
        api.loop_thread.run(asyncio.wait_for(holding.wait(), 10))
        assert api.loop_thread.run(background_work(), timeout=10) < 1.0
        started = time.monotonic()
        response = httpx.get(f"{api.base_url}/files/{file_id}", headers=headers(key), timeout=30)
        waited = time.monotonic() - started
    finally:
        api.loop_thread.loop.call_soon_threadsafe(released.set)
        holder.result(10)
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"] == {
        "message": "The server is busy: no database connection became free in time. Retry shortly.",
        "type": "server_error",
        "param": None,
        "code": "database_busy",
    }
    assert 2.5 < waited < 10, f"answered after {waited:.1f}s; db_pool_timeout is 3 s"
    after = httpx.get(f"{api.base_url}/files/{file_id}", headers=headers(key), timeout=30)
    assert after.status_code == 200, after.text


def test_pools_are_sized_from_the_settings(api: LiveServer) -> None:
    ctx = api.app.state.ctx
    api_pool = ctx.read_sessions.kw["bind"].sync_engine.pool
    work_pool = ctx.for_work.read_sessions.kw["bind"].sync_engine.pool
    assert api_pool is not work_pool
    assert (api_pool.size(), api_pool._max_overflow, api_pool._timeout) == (POOL, 0, 3.0)
    assert (work_pool.size(), work_pool._max_overflow) == (3, 0)
