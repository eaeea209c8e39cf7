"""Uploads onto a full disk, over real HTTP, without an engine: the data directory is a real
48 MiB tmpfs (the SQLite database and the metrics live elsewhere) that a filler file takes
up. ``POST /v1/files`` and the Uploads API's parts and completion get a 507 in OpenAI's
error shape naming the storage, store nothing (no blob, no row), ``/ready`` is 503 with a
``storage`` reason and ``/metrics`` says so; once the filler is gone the same calls work.
A full temporary directory (the multipart spool) is a 507 too."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TINY_NAME, LiveServer, LoopThread, engine_settings, start_server
from tests.helpers import chat_line, jsonl
from tests.metrics_helpers import scrape
from tests.tmpfs import fill, small_tmpfs

MIB = 1024 * 1024
MIN_FREE = 1 * MIB


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with small_tmpfs(tmp_path_factory.mktemp("disk"), "48m") as mount:
        yield mount


@pytest.fixture(scope="module")
def api(
    loop_thread: LoopThread,
    tiny_model: Path,
    disk: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    elsewhere = tmp_path_factory.mktemp("not-on-the-tmpfs")
    settings = engine_settings(
        tiny_model,
        database_url=f"sqlite+aiosqlite:///{elsewhere / 'db.sqlite'}",
        metrics_dir=elsewhere / "metrics",
        data_dir=disk / "data",
        worker=False,
        storage_min_free_bytes=MIN_FREE,
    )
    yield from start_server(loop_thread, settings, None)


def batch_file(size: int) -> bytes:
    """A valid batch file of about ``size`` bytes."""
    line = len(jsonl([chat_line(0, TINY_NAME, "x" * 4000)]))
    return jsonl([chat_line(i, TINY_NAME, "x" * 4000) for i in range(size // line + 1)])


def blobs(disk: Path) -> list[str]:
    """Every file under the data directory (the top-level folders do not count)."""
    root = disk / "data"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def ready(api: LiveServer) -> httpx.Response:
    return httpx.get(f"{api.url}/ready", timeout=30)


def assert_storage_full(response: httpx.Response, disk: Path) -> None:
    assert response.status_code == 507, response.text
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "storage_full"
    assert error["message"] == (
        f"The file storage (local directory {disk / 'data'}) is full: "
        "No space left on device (ENOSPC). Nothing was stored; retry once space is freed."
    )


def post_file(api: LiveServer, body: bytes) -> httpx.Response:
    return httpx.post(
        f"{api.base_url}/files",
        files={"file": ("big.jsonl", body)},
        data={"purpose": "batch"},
        timeout=60,
    )


def test_file_upload_onto_a_full_disk(api: LiveServer, disk: Path) -> None:
    assert ready(api).status_code == 200, ready(api).text
    body = batch_file(8 * MIB)
    filler = fill(disk, leave=4 * MIB)
    try:
        assert ready(api).status_code == 200  # 4 MiB free is above the 1 MiB minimum
        assert_storage_full(post_file(api, body), disk)
        assert blobs(disk) == []  # no partial blob, no temporary file
        assert httpx.get(f"{api.base_url}/files").json()["data"] == []  # no row

        response = ready(api)
        assert response.status_code == 503, response.text
        state = response.json()
        assert state["status"] == "not_ready" and state["storage"]["state"] == "full"
        assert state["reasons"]["storage"].startswith("a write was refused")
        assert "No space left on device (ENOSPC)" in state["reasons"]["storage"]
        assert str(disk) not in response.text  # the location only with an admin key
        metrics = scrape(f"{api.url}/metrics")
        assert metrics.get("vllm_batch_storage_ok") == 0
        assert metrics.get("vllm_batch_storage_write_refusals_total") >= 1
        assert 3 * MIB < metrics.get("vllm_batch_storage_free_bytes") < 5 * MIB
    finally:
        filler.unlink()

    stored = post_file(api, body)
    assert stored.status_code == 200, stored.text
    file_id = stored.json()["id"]
    assert httpx.get(f"{api.base_url}/files/{file_id}/content", timeout=60).content == body
    assert ready(api).status_code == 200, ready(api).text  # the successful write cleared it
    assert scrape(f"{api.url}/metrics").get("vllm_batch_storage_ok") == 1
    assert httpx.delete(f"{api.base_url}/files/{file_id}").status_code == 200


def test_ready_is_503_while_free_space_is_below_the_minimum(api: LiveServer, disk: Path) -> None:
    filler = fill(disk, leave=MIB // 2)
    try:
        response = ready(api)
        assert response.status_code == 503, response.text
        reason = response.json()["reasons"]["storage"]
        assert reason.startswith("file storage is almost full: 0.5 MiB free, below the 1.0 MiB")
        assert scrape(f"{api.url}/metrics").get("vllm_batch_storage_ok") == 0
    finally:
        filler.unlink()
    assert ready(api).status_code == 200, ready(api).text


def create_upload(api: LiveServer, size: int) -> str:
    response = httpx.post(
        f"{api.base_url}/uploads",
        json={
            "purpose": "batch",
            "filename": "parts.jsonl",
            "bytes": size,
            "mime_type": "text/jsonl",
        },
    )
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def add_part(api: LiveServer, upload_id: str, data: bytes) -> httpx.Response:
    return httpx.post(
        f"{api.base_url}/uploads/{upload_id}/parts", files={"data": ("part", data)}, timeout=60
    )


def complete(api: LiveServer, upload_id: str, part_ids: list[str]) -> httpx.Response:
    return httpx.post(
        f"{api.base_url}/uploads/{upload_id}/complete", json={"part_ids": part_ids}, timeout=60
    )


def test_upload_parts_and_completion_onto_a_full_disk(api: LiveServer, disk: Path) -> None:
    body = batch_file(8 * MIB)
    half = body.rfind(b"\n", 0, len(body) // 2) + 1
    pieces = [body[:half], body[half:]]
    upload_id = create_upload(api, len(body))

    filler = fill(disk, leave=2 * MIB)
    try:
        assert_storage_full(add_part(api, upload_id, pieces[0]), disk)
        assert blobs(disk) == []  # no part blob, and the upload's own folder is gone
        assert not (disk / "data" / "uploads" / upload_id).exists()
    finally:
        filler.unlink()

    parts: list[dict[str, Any]] = []
    for piece in pieces:
        response = add_part(api, upload_id, piece)
        assert response.status_code == 200, response.text
        parts.append(response.json())
    part_ids = [part["id"] for part in parts]

    filler = fill(disk, leave=2 * MIB)  # the parts fit; the joined file does not
    try:
        assert_storage_full(complete(api, upload_id, part_ids), disk)
        assert blobs(disk) == [f"uploads/{upload_id}/{part_id}" for part_id in sorted(part_ids)]
        assert httpx.get(f"{api.base_url}/files").json()["data"] == []
        assert ready(api).status_code == 503
    finally:
        filler.unlink()

    done = complete(api, upload_id, part_ids)  # the parts are still there: retry works
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "completed"
    file_id = done.json()["file"]["id"]
    assert httpx.get(f"{api.base_url}/files/{file_id}/content", timeout=60).content == body
    assert blobs(disk) == [f"files/{file_id}"]  # parts and their folder went
    assert ready(api).status_code == 200, ready(api).text


def test_upload_spool_on_a_full_temporary_directory(
    api: LiveServer, disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A multipart upload is spooled to the temporary directory before the route runs; when
    that is full the answer is a 507 naming it, not FastAPI's 400 "error parsing the body"."""
    spool = disk / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))  # this process: the server's too
    before = blobs(disk), httpx.get(f"{api.base_url}/files").json()["data"]
    filler = fill(disk, leave=2 * MIB)
    try:
        response = post_file(api, batch_file(8 * MIB))
    finally:
        filler.unlink()
    assert response.status_code == 507, response.text
    error = response.json()["error"]
    assert error["code"] == "storage_full" and error["message"].startswith(
        f"The file storage (temporary directory {spool}) is full: No space left on device"
    )
    after = blobs(disk), httpx.get(f"{api.base_url}/files").json()["data"]
    assert after == before and list(spool.iterdir()) == []
