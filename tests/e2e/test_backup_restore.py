"""docs/backup.md's commands, run as written: a backup of a running server, restored on a new
data directory (and, for PostgreSQL, a new database), serves the same files and signs
webhooks with the same secret.

API-only servers (``--no-worker``): a backup is about the database and the file storage,
not the engine. Each command runs with ``bash -e`` in the server's working directory, as
an operator would run it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import create_pg_database, drop_pg_database
from tests.doc_blocks import noted
from tests.e2e.conftest import ServerProcess, served

server_on = contextlib.contextmanager(served)

THIS = "tests/e2e/test_backup_restore.py"
LINES = b'{"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}]}}\n'  # noqa: E501


def bash(code: str, cwd: Path, **env: str) -> None:
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    result = subprocess.run(
        ["bash", "-ec", code],
        cwd=cwd,
        env={**os.environ, "PATH": path, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def upload(server: ServerProcess) -> str:
    """A batch file and an uploaded text file; returns the batch file's id."""
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        answer = client.post(
            "/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", LINES)}
        )
        answer.raise_for_status()
        client.post(
            "/files", data={"purpose": "user_data"}, files={"file": ("a.txt", b"kept")}
        ).raise_for_status()
        return str(answer.json()["id"])


def content(server: ServerProcess, file_id: str) -> bytes:
    answer = httpx.get(f"{server.base_url}/files/{file_id}/content", timeout=30)
    answer.raise_for_status()
    return answer.content


def secret(home: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "vllm_batch.cli", "webhook-secret", *args],
        cwd=home,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return result.stdout.strip()


def test_sqlite_backup_of_a_running_server_restores(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    with server_on(["--no-worker"], old / "data", wait_engine=False) as server:
        file_id = upload(server)
        bash(noted(THIS, "SQLite, while the server runs").code, old)
    assert sorted(p.name for p in (old / "backup").iterdir()) == ["files.tar", "vllm-batch.db"]
    new.mkdir()
    shutil.copytree(old / "backup", new / "backup")
    bash(noted(THIS, "SQLite: a new server").code, new)
    with server_on(["--no-worker"], new / "data", wait_engine=False) as server:
        assert content(server, file_id) == LINES
        listed = httpx.get(f"{server.base_url}/files", timeout=30).json()["data"]
        assert len(listed) == 2
    assert secret(new, "--data-dir", "data") == secret(old, "--data-dir", "data")


@pytest.fixture
def two_databases() -> Iterator[list[str]]:
    urls = [create_pg_database(), create_pg_database()]
    yield urls
    for url in urls:
        drop_pg_database(url)


def libpq(url: str) -> str:
    """The SQLAlchemy URL as pg_dump takes it (no ``+asyncpg``)."""
    return url.replace("postgresql+asyncpg://", "postgresql://")


def test_postgres_backup_of_a_running_server_restores(
    tmp_path: Path, two_databases: list[str]
) -> None:
    source, target = two_databases
    old, new = tmp_path / "old", tmp_path / "new"
    with server_on(
        ["--no-worker", "--database-url", source], old / "data", wait_engine=False
    ) as server:
        file_id = upload(server)
        bash(noted(THIS, "PostgreSQL, while the server runs").code, old, DATABASE_URL=libpq(source))
    new.mkdir()
    shutil.copytree(old / "backup", new / "backup")
    bash(noted(THIS, "PostgreSQL: a new server").code, new, DATABASE_URL=libpq(target))
    with server_on(
        ["--no-worker", "--database-url", target], new / "data", wait_engine=False
    ) as server:
        assert content(server, file_id) == LINES
    assert secret(new, "--database-url", target) == secret(old, "--database-url", source)
