"""engines/start_method.py: when vLLM's engine processes are forked instead of spawned
(pure logic; the commands' real engines fork in every end-to-end test that starts one)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator

import pytest

from vllm_batch.engines import start_method
from vllm_batch.engines.start_method import METHOD_ENV, allow_fork, chosen_method, engine_start


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As a new process: fork not allowed yet, no method in the environment."""
    monkeypatch.setattr(start_method, "_may_fork", False)
    monkeypatch.delenv(METHOD_ENV, raising=False)
    yield


def platform_asks_spawn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(METHOD_ENV, "spawn")  # what vLLM's CPU platform does


def test_a_command_forks_its_first_engine_only(monkeypatch: pytest.MonkeyPatch) -> None:
    allow_fork()
    user = chosen_method()
    platform_asks_spawn(monkeypatch)
    with engine_start(user) as method:
        assert method == "fork"
        assert os.environ[METHOD_ENV] == "fork"
    assert os.environ[METHOD_ENV] == "spawn"  # restored for vLLM
    with engine_start(user) as method:  # a restart or a swap: requests have run since
        assert method == "spawn" and os.environ[METHOD_ENV] == "spawn"


def test_without_allow_fork_vllm_spawns(monkeypatch: pytest.MonkeyPatch) -> None:
    user = chosen_method()
    platform_asks_spawn(monkeypatch)
    with engine_start(user) as method:
        assert method == "spawn"


def test_a_method_the_user_set_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    allow_fork()
    monkeypatch.setenv(METHOD_ENV, "spawn")
    user = chosen_method()
    with engine_start(user) as method:
        assert method == "spawn"


def test_off_cpu_vllm_keeps_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    allow_fork()
    with engine_start(chosen_method()) as method:  # no platform override (a GPU)
        assert method is None


class SlowStream:
    """A log stream whose write holds its own lock until ``go`` is set."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.writing = threading.Event()
        self.go = threading.Event()

    def write(self, text: str) -> None:
        with self.lock:
            self.writing.set()
            self.go.wait(10)

    def flush(self) -> None:
        pass


def test_no_thread_is_mid_write_to_a_log_stream_when_vllm_forks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = SlowStream()
    handler = logging.StreamHandler(stream)  # type: ignore[arg-type]
    logger = logging.getLogger("fork-test")
    logger.addHandler(handler)
    try:
        allow_fork()
        platform_asks_spawn(monkeypatch)
        writer = threading.Thread(target=logger.warning, args=("a line",))
        writer.start()
        assert stream.writing.wait(5)  # the other thread is inside the stream's write
        threading.Timer(0.3, stream.go.set).start()
        with engine_start(None):
            read, write = os.pipe()
            pid = os.fork()  # waits for the write to end: the handler's lock is taken first
            if pid == 0:
                os.write(write, b"1" if stream.lock.acquire(timeout=2) else b"0")
                os._exit(0)
            os.close(write)
            assert os.read(read, 1) == b"1", "the child inherited a held stream lock"
            os.waitpid(pid, 0)
        writer.join(5)
        assert handler.lock is not None and handler.lock.acquire(blocking=False)  # released
        handler.lock.release()
    finally:
        logger.removeHandler(handler)


def test_the_child_does_not_share_the_parents_signal_wakeup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A signal to the engine process must not reach the parent's event loop."""
    wakeup_read, wakeup_write = socket.socketpair()
    wakeup_write.setblocking(False)
    previous = signal.set_wakeup_fd(wakeup_write.fileno())
    try:
        allow_fork()
        platform_asks_spawn(monkeypatch)
        with engine_start(None):
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                inherited = signal.set_wakeup_fd(-1)
                os.write(write, b"1" if inherited == -1 else b"0")
                os._exit(0)
            os.close(write)
            assert os.read(read, 1) == b"1", "the child kept the parent's wakeup descriptor"
            os.waitpid(pid, 0)
        assert signal.set_wakeup_fd(wakeup_write.fileno()) == wakeup_write.fileno()
    finally:
        signal.set_wakeup_fd(previous)
        wakeup_read.close()
        wakeup_write.close()
