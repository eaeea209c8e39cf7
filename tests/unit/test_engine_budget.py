"""The test suite's engine budget itself: slots are exclusive across processes, a full
budget waits and then names its holders, and a dead holder's slot comes back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import engine_budget


@pytest.fixture
def budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(engine_budget, "SLOT_DIR", tmp_path)
    monkeypatch.setattr(engine_budget, "ENGINE_BUDGET", 2)
    monkeypatch.setattr(engine_budget, "SLOT_WAIT_SECONDS", 1.0)
    return tmp_path


def test_a_full_budget_waits_then_names_the_holders(budget: Path) -> None:
    first, second = engine_budget.acquire("a"), engine_budget.acquire("b")
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"no engine slot for 'c' .*budget 2.* a', '\d+ b"):
        engine_budget.acquire("c")
    assert time.monotonic() - started >= 1.0
    second.release()
    third = engine_budget.acquire("c")  # a released slot is taken again
    assert third.index == second.index
    first.release()
    third.release()


def test_a_slot_held_by_another_process_is_freed_when_it_dies(budget: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl,os,time;"
         f"fd=os.open('{budget}/slot-0', os.O_RDWR|os.O_CREAT);"
         "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'holder'); print('held', flush=True);"
         "time.sleep(60)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        mine = engine_budget.acquire("mine")
        assert mine.index == 1  # slot 0 is the other process's
        with pytest.raises(TimeoutError):
            engine_budget.acquire("more")
        holder.kill()
        holder.wait(10)
        freed = engine_budget.acquire("after")  # the kernel dropped the dead holder's lock
        assert freed.index == 0
        freed.release()
        mine.release()
    finally:
        holder.kill()


def test_a_crashed_workers_group_is_killed_and_only_its_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group whose starter died is reaped, but only processes carrying this run's id."""
    groups = tmp_path / "groups"
    monkeypatch.setattr(engine_budget, "GROUPS_DIR", groups)
    monkeypatch.setattr(engine_budget, "_RUN_ID", "run-under-test")
    ours = subprocess.Popen(["sleep", "60"], start_new_session=True, env={**os.environ, **RUN_ENV})
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    live_starter = subprocess.Popen(["sleep", "60"])
    kept = subprocess.Popen(["sleep", "60"], start_new_session=True, env={**os.environ, **RUN_ENV})
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        groups.mkdir()
        for process in (ours, other):
            (groups / str(process.pid)).write_text(str(dead.pid))  # their starter is gone
        (groups / str(kept.pid)).write_text(str(live_starter.pid))
        assert engine_budget.reap_orphan_groups() == [ours.pid]
        assert ours.wait(10) == -signal.SIGKILL
        assert other.poll() is None and kept.poll() is None  # not this run's / starter alive
        assert sorted(p.name for p in groups.iterdir()) == [str(kept.pid)]
    finally:
        for process in (ours, other, kept, live_starter):
            process.kill()
            process.wait()


RUN_ENV = {"PYTEST_XDIST_TESTRUNUID": "run-under-test"}
