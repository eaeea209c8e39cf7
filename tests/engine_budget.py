"""A budget of vLLM engines alive at once across the whole test session.

Every engine a test starts, in this process (``EngineShelf``) or in a subprocess (a server,
a worker, ``vllm-batch run``, a vLLM upstream, a Ray replica: ``engine_slot``), first takes
one of ``ENGINE_BUDGET`` slots. A slot is an exclusive ``flock`` on a file in a directory
shared by every xdist worker of the run; the kernel drops it if its holder dies, so a
crashed test never leaks one.

In-process engines are kept on a shelf after their module ends, so the next module that
needs the same model reuses it (an engine start costs 20-30 s here). An idle shelved engine
is stopped when its process needs a slot, or when another process has waited for one for a
while (``EVICT_AFTER``): no process keeps memory that another one needs.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENGINE_BUDGET = int(os.environ.get("VLLM_BATCH_TEST_ENGINES", "5"))
"""At most this many vLLM engines alive at once in the whole run (all xdist workers)."""
SLOT_WAIT_SECONDS = 900.0
EVICT_AFTER = 2.0
"""A process that waited this long for a slot makes other processes stop their idle engines."""
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
SLOT_DIR = Path(tempfile.gettempdir()) / f"vllm-batch-test-engines-{_RUN_ID}"
_PAUSE = threading.Event()
"""Never set: ``_PAUSE.wait(s)`` sleeps without ``time.sleep``, which tests may replace."""


EVENTS_FILE = Path(".pytest-engines.tsv").absolute()
"""Every slot taken and given back (time, pid, event, seconds waited or held, label): how
many engines the run started, and how long tests waited for one. Started afresh by the
controller (``tests/suite_report.py``)."""


def record(event: str, seconds: float, label: str) -> None:
    line = f"{time.time():.1f}\t{os.getpid()}\t{event}\t{seconds:.1f}\t{label}\n"
    with contextlib.suppress(OSError), open(EVENTS_FILE, "a") as events:
        events.write(line)


@dataclass
class Slot:
    """One held slot: an open file with an exclusive lock on it."""

    index: int
    label: str
    _fd: int | None = field(default=None, repr=False)
    taken_at: float = field(default_factory=time.monotonic)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            record("release", time.monotonic() - self.taken_at, self.label)


def _try_slot(index: int, label: str) -> Slot | None:
    fd = os.open(SLOT_DIR / f"slot-{index}", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {label}\n".encode())
    return Slot(index, label, fd)


def holders() -> list[str]:
    """Who holds the slots now (pid and label), for failure messages."""
    found = []
    for path in sorted(SLOT_DIR.glob("slot-*")):
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            found.append(path.read_text().strip())
        finally:
            os.close(fd)
    return found


def _waiting_file() -> Path:
    return SLOT_DIR / f"waiting-{os.getpid()}"


def others_waiting() -> bool:
    """Whether another live process has waited for a slot for over ``EVICT_AFTER``."""
    now = time.time()
    for path in SLOT_DIR.glob("waiting-*"):
        pid = int(path.name.split("-", 1)[1])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            waited = now - path.stat().st_mtime
        except (ProcessLookupError, FileNotFoundError):
            continue
        if waited >= EVICT_AFTER:
            return True
    return False


def acquire(label: str, make_room: Callable[[], bool] = lambda: False) -> Slot:
    """Take a free slot, waiting (with ``make_room`` asked to free one of ours) until one is."""
    SLOT_DIR.mkdir(parents=True, exist_ok=True)
    reap_orphan_groups()
    started = time.monotonic()
    deadline = started + SLOT_WAIT_SECONDS
    announced = False
    try:
        while True:
            for index in range(ENGINE_BUDGET):
                slot = _try_slot(index, label)
                if slot is not None:
                    record("acquire", time.monotonic() - started, label)
                    return slot
            if make_room():
                continue
            if not announced:
                _waiting_file().touch()
                announced = True
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no engine slot for {label!r} after {SLOT_WAIT_SECONDS:.0f}s "
                    f"(budget {ENGINE_BUDGET}); held by: {holders()}"
                )
            _PAUSE.wait(0.2)
    finally:
        if announced:
            with contextlib.suppress(FileNotFoundError):
                _waiting_file().unlink()


@contextlib.contextmanager
def engine_slot(label: str) -> Iterator[Slot]:
    """Hold a slot while a subprocess with an engine (server, worker, ``run``...) lives."""
    slot = engine_slot_acquire(label)
    try:
        yield slot
    finally:
        slot.release()


def budgeted_popen(label: str, *args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen`` for a command that starts an engine: it takes a slot first and
    gives it back once the process and its group (engine core included) are gone.
    The command runs in a new session, so its group is its own."""
    slot = engine_slot_acquire(label)
    try:
        kwargs.setdefault("start_new_session", True)
        process: subprocess.Popen[bytes] = subprocess.Popen(*args, **kwargs)
        track_group(process.pid)
    except BaseException:
        slot.release()
        raise

    def give_back() -> None:
        try:
            process.wait()
            reap_group(process.pid)
        finally:
            slot.release()

    threading.Thread(target=give_back, daemon=True, name=f"slot {label}").start()
    return process


def budgeted_run(label: str, *args: Any, **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run`` for a command that starts an engine, inside a slot."""
    with engine_slot(label):
        return subprocess.run(*args, **kwargs)


def engine_slot_acquire(label: str) -> Slot:
    """A slot for an engine outside the shelf; this process's idle shelved engines make room."""
    return acquire(label, make_room=SHELF.evict_one)


@dataclass
class _Shelved:
    engine: Any
    slot: Slot
    leases: int = 0
    last_used: float = 0.0


class EngineShelf:
    """This process's in-process engines, each holding a slot, kept between modules."""

    def __init__(self) -> None:
        self._engines: dict[str, _Shelved] = {}
        self._lock = threading.RLock()
        self._run: Callable[[Any], Any] | None = None
        self._watcher: threading.Thread | None = None

    def bind(self, run: Callable[[Any], Any]) -> None:
        """``run(coro)`` runs a coroutine where the engines live (the session's loop thread)."""
        self._run = run
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, daemon=True)
            self._watcher.start()

    @contextlib.contextmanager
    def lease(self, key: str, make: Callable[[], Any]) -> Iterator[Any]:
        """The engine for ``key``, started (with a slot) unless shelved; shelved afterwards."""
        assert self._run is not None, "EngineShelf.bind was not called"
        with self._lock:
            entry = self._engines.get(key)
            if entry is not None:
                entry.leases += 1
        if entry is None:
            slot = acquire(key, make_room=self.evict_one)
            engine = make()
            try:
                self._run(engine.start())
            except BaseException:
                slot.release()
                raise
            entry = _Shelved(engine, slot, leases=1)
            with self._lock:
                self._engines[key] = entry
        try:
            yield entry.engine
        finally:
            with self._lock:
                entry.leases -= 1
                entry.last_used = time.monotonic()

    def evict_one(self) -> bool:
        """Stop the least recently used idle engine; whether there was one."""
        with self._lock:
            idle = [(e.last_used, k) for k, e in self._engines.items() if e.leases == 0]
            if not idle:
                return False
            key = min(idle)[1]
            entry = self._engines.pop(key)
        log.info("engine budget: stopping idle engine %s", key)
        record("evict", time.monotonic() - entry.last_used, key)
        try:
            assert self._run is not None
            self._run(entry.engine.stop())
        finally:
            entry.slot.release()
        return True

    def _watch(self) -> None:
        while True:
            _PAUSE.wait(0.5)
            with contextlib.suppress(Exception):
                if others_waiting():
                    self.evict_one()

    def close(self) -> None:
        while self.evict_one():
            pass
        with self._lock:
            busy = list(self._engines)
        assert not busy, f"engines still leased at session end: {busy}"


SHELF = EngineShelf()


def group_alive(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    import psutil

    alive = []
    for proc in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                alive.append(proc.pid)
    return alive


def reap_group(pgid: int, timeout: float = 30) -> None:
    """Wait until no process of group ``pgid`` is left (vLLM's engine-core children too),
    killing what outlives ``timeout``: a slot is given back only once its memory is."""
    deadline = time.monotonic() + timeout
    while group_alive(pgid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            break
        _PAUSE.wait(0.2)
    (GROUPS_DIR / str(pgid)).unlink(missing_ok=True)


GROUPS_DIR = SLOT_DIR / "groups"
"""One file per engine process group a test started, named by its id, holding the pid of
the xdist worker that started it (and reaps it: ``reap_group``)."""


def track_group(pgid: int) -> None:
    """Note that this process started group ``pgid``. If this process dies before it reaps
    the group (pytest-timeout ends a hung xdist worker), ``reap_orphan_groups`` kills what
    is left of it, so its engines neither outlive their slot nor the run."""
    GROUPS_DIR.mkdir(parents=True, exist_ok=True)
    (GROUPS_DIR / str(pgid)).write_text(str(os.getpid()))


def _running(pid: int) -> bool:
    import psutil

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _of_this_run(pid: int) -> bool:
    """Whether ``pid`` descends from this pytest run (it inherited the run's xdist id)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"PYTEST_XDIST_TESTRUNUID={_RUN_ID}".encode() in environ.split(b"\0")


def reap_orphan_groups() -> list[int]:
    """Kill the processes of tracked groups whose xdist worker died without reaping them
    (only processes of this run: a group id may since have been reused); their pids."""
    killed: list[int] = []
    entries = list(GROUPS_DIR.iterdir()) if GROUPS_DIR.is_dir() else []
    for entry in entries:
        with contextlib.suppress(FileNotFoundError, ValueError):
            if _running(int(entry.read_text())):
                continue
            for pid in group_alive(int(entry.name)):
                if _of_this_run(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            entry.unlink(missing_ok=True)
    if killed:
        log.warning("killed %d processes left by a crashed xdist worker: %s", len(killed), killed)
    return killed
