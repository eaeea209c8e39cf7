"""Lease owner ids and dead-owner detection: exact parsing, PID scopes, shared hostnames."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import update

from tests.unit.test_lifecycle import new_batch, store
from vllm_batch.batches import lifecycle
from vllm_batch.batches.housekeeping import release_dead_owners
from vllm_batch.batches.states import ChunkStatus
from vllm_batch.batches.store.identity import InstanceId
from vllm_batch.batches.store.rows import ChunkRow
from vllm_batch.batches.store_context import StoreContext


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_round_trip_and_exact_parsing() -> None:
    me = InstanceId.new()
    assert InstanceId.parse(str(me)) == me
    assert me.pid == os.getpid()
    odd = InstanceId("worker-2", "abc", 12, "ff")  # a host name ending in -2
    assert InstanceId.parse(str(odd)) == odd
    for bad in ("", "host-12-ab", "h/ns/x/t", "h/ns/1", "h/ns/1/t/extra", "h//1/t"):
        assert InstanceId.parse(bad) is None


def test_shared_hostname_and_pid_in_another_namespace_is_not_judged() -> None:
    me = InstanceId.new()
    other_container = replace(me, namespace="0" * 12, pid=1, token="beef")
    assert not me.sees_dead(other_container)
    same_pid_other_container = replace(me, namespace="1" * 12, token="cafe")
    assert not me.sees_dead(same_pid_other_container)


def test_dead_and_live_owners_in_our_scope() -> None:
    me = InstanceId.new()
    assert not me.sees_dead(me)
    assert me.sees_dead(replace(me, token="0ld0"))  # earlier incarnation of our pid
    assert me.sees_dead(replace(me, pid=dead_pid(), token="x"))
    assert not me.sees_dead(replace(me, pid=os.getppid(), token="x"))


@pytest.fixture
async def ctx(database_url: str, tmp_path: Path) -> AsyncIterator[StoreContext]:
    async with store(database_url, tmp_path) as context:
        yield context


async def test_housekeeping_releases_only_dead_owners_of_our_scope(ctx: StoreContext) -> None:
    me = ctx.instance
    owners = {
        "dead": replace(me, pid=dead_pid(), token="d"),
        "alive": replace(me, pid=os.getppid(), token="a"),
        "other-container": replace(me, namespace="f" * 12, pid=1, token="c"),
    }
    chunks = {}
    for name, owner in owners.items():
        batch_id = await new_batch(ctx)
        chunk = await lifecycle.claim_chunk(ctx, str(owner), [batch_id])
        assert chunk is not None
        chunks[name] = chunk.id
    assert await release_dead_owners(ctx) == 1
    async with ctx.read_sessions() as session:
        states = {
            name: (await session.get(ChunkRow, chunk_id, populate_existing=True))
            for name, chunk_id in chunks.items()
        }
    assert states["dead"] is not None and states["dead"].status == ChunkStatus.QUEUED
    assert states["alive"] is not None and states["alive"].status == ChunkStatus.RUNNING
    assert states["other-container"] is not None
    assert states["other-container"].status == ChunkStatus.RUNNING
    async with ctx.sessions() as session, session.begin():  # leave nothing running
        await session.execute(
            update(ChunkRow).where(ChunkRow.id.in_(chunks.values())).values(lease_until=time.time())
        )
