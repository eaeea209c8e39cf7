"""serve's worker process, its parts that need no child: how it is started, what it is
told (its settings, as JSON) and what the API makes of its status."""

from __future__ import annotations

import os
import sys
import types

import pytest

from vllm_batch.batches.store.notify import WorkNotifier
from vllm_batch.config import Settings
from vllm_batch.runtime.worker_process import CLI_ENTRY_MARK, WorkerProcess, entry_module
from vllm_batch.worker.status import WorkerStatus


@pytest.mark.parametrize(
    ("spec_name", "cli", "expected"),
    [
        (None, False, "vllm_batch.cli"),  # the vllm-batch console script
        ("vllm_batch.cli.__main__", True, "vllm_batch.cli"),  # python -m vllm_batch.cli
        ("tests.paced", True, "tests.paced"),  # the tests' paced CLI: its children are paced
        ("pytest", False, "vllm_batch.cli"),  # python -m pytest: not a vllm-batch command
        ("uvicorn.__main__", False, "vllm_batch.cli"),  # python -m uvicorn vllm_batch...
    ],
)
def test_the_child_starts_through_the_module_serve_started_from(
    monkeypatch: pytest.MonkeyPatch, spec_name: str | None, cli: bool, expected: str
) -> None:
    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name=spec_name) if spec_name else None  # type: ignore[assignment]
    if cli:
        setattr(main, CLI_ENTRY_MARK, True)
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert entry_module() == expected


def test_the_real_cli_modules_carry_the_mark() -> None:
    import tests.paced
    import vllm_batch.cli.__main__ as cli_main  # guarded: importing it runs nothing

    assert getattr(cli_main, CLI_ENTRY_MARK) is True
    assert getattr(tests.paced, CLI_ENTRY_MARK) is True


def test_settings_reach_the_child_unchanged() -> None:
    settings = Settings(
        models=["a=/models/a", "b=/models/b"],
        api_key="sk-0123456789abcdef",
        engine_urls=["http://127.0.0.1:9000/v1"],
        max_num_seqs=7,
        worker_nice=3,
        webhook_secret="whsec_c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0",
    )
    again = Settings.model_validate_json(settings.model_dump_json())
    assert again == settings
    assert again.model_dump() == settings.model_dump()


def test_worker_nice_is_bounded() -> None:
    with pytest.raises(ValueError, match="worker_nice"):
        Settings(worker_nice=20)


def test_status_round_trips_and_a_dead_worker_is_not_ready() -> None:
    status = WorkerStatus(
        worker_id="vm/h/1/ab",
        ok=True,
        state={"enabled": True, "alive": True, "engine": "ready"},
        details={"id": "vm/h/1/ab"},
        gpu={"guard": "off", "gpus": []},
        loaded_model="tiny",
    )
    assert WorkerStatus.from_json(status.to_json()) == status
    down = status.not_running("worker process is not running (restarting)")
    assert (down.ok, down.state["alive"], down.loaded_model) == (False, False, None)
    assert down.reason == "worker process is not running (restarting)"


def test_before_its_first_status_the_worker_is_not_ready() -> None:
    child = WorkerProcess(Settings())
    status = child.current_status()
    assert status.ok is False
    assert status.state["alive"] is False
    assert status.reason is not None and "worker process" in status.reason
    assert status.loaded_model is None  # serve's banner waits


def test_local_wake_ups_reach_the_worker_process() -> None:
    woken: list[str] = []
    notifier = WorkNotifier("sqlite+aiosqlite:///:memory:")
    notifier.forward(lambda: woken.append("child"))
    notifier.wake()
    notifier.wake()
    assert woken == ["child", "child"]


def test_embedded_worker_run_by_hand_says_who_starts_it() -> None:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "vllm_batch.cli", "embedded-worker"],
        input=b"",
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert b"embedded-worker: serve starts this command (settings on stdin)" in done.stderr


def test_raw_lines_read_the_settings_line_then_each_wake_up() -> None:
    from vllm_batch.cli.embedded_worker import RawLines

    read, write = os.pipe()
    os.write(write, b'{"settings": 1}\nwake\nwake\npartial')
    os.close(write)
    lines = RawLines(read)
    assert lines.readline() == b'{"settings": 1}\n'
    assert [lines.readline() for _ in range(4)] == [b"wake\n", b"wake\n", b"partial", b""]
    os.close(read)
