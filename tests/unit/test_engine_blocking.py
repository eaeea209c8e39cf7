"""Blocking start-up steps in daemon threads: results, errors, and a launch abandoned mid-way."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time

import pytest

from vllm_batch.engines.blocking import in_daemon_thread, launch_processes


def test_result_and_error_come_back() -> None:
    async def main() -> tuple[int, str]:
        value = await in_daemon_thread(lambda: 6 * 7, "answer")
        with pytest.raises(ValueError, match="bad") as info:
            await in_daemon_thread(_raise_bad, "bad")
        return value, str(info.value)

    assert asyncio.run(main()) == (42, "bad")


def _raise_bad() -> None:
    raise ValueError("bad")


def test_a_cancelled_caller_does_not_wait_for_the_thread() -> None:
    release = threading.Event()

    async def main() -> None:
        task = asyncio.create_task(in_daemon_thread(release.wait, "slow"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(main())
        assert not release.is_set()  # the call is still blocked: nobody waited for it
        assert any(thread.name == "slow" for thread in threading.enumerate())
    finally:
        release.set()


def _launch_and_wait(procs: list[multiprocessing.Process]) -> str:
    """Like an engine launch: start a child process, block until it is ready (never)."""
    proc = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(600,))
    proc.start()
    procs.append(proc)
    proc.join()  # returns once the child is gone
    if proc.exitcode != 0:
        raise RuntimeError(f"engine process died ({proc.exitcode})")
    return "client"


def test_an_abandoned_launch_stops_its_processes() -> None:
    procs: list[multiprocessing.Process] = []
    released: list[str] = []

    async def main() -> None:
        task = asyncio.create_task(
            launch_processes(lambda: _launch_and_wait(procs), "launch", released.append)
        )
        while not procs or not procs[0].is_alive():
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert procs[0].exitcode is not None and procs[0].exitcode < 0  # terminated
    assert released == []  # the launch failed: nothing to release


def test_a_launch_that_finished_anyway_is_released() -> None:
    released: list[str] = []
    gate = threading.Event()

    def launch() -> str:
        gate.wait(10)
        return "client"

    async def main() -> None:
        task = asyncio.create_task(launch_processes(launch, "launch", released.append))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0)
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert released == ["client"]
