"""The dashboard's HTTP surface on a live server without a worker (SQLite and PostgreSQL):
``/`` redirects browsers only, the page and its assets load without a key, and the
``/v1/dashboard`` JSON keeps per-key ownership (lease owners and workers for admins only).

A chunk is claimed and an error line saved through the store's own functions, as a worker
in another process would, so leases and saved errors are real rows."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    TINY_NAME,
    LiveServer,
    LoopThread,
    api_only_server,
    engine_settings,
    start_server,
)
from tests.helpers import chat_line, jsonl
from vllm_batch.batches.store import queries
from vllm_batch.pipeline.line_result import LineResult
from vllm_batch.pipeline.output import failure_line

KEYS = {"team-a": "sk-dash-a", "team-b": "sk-dash-b", "ops": "sk-dash-ops"}
REMOTE_WORKER = "other-host/0123456789ab/4242/tok"
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
CHUNK = 4


@pytest.fixture(scope="module")
def api(
    loop_thread: LoopThread,
    tiny_model: Path,
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    yield from api_only_server(
        loop_thread,
        tiny_model,
        database_url,
        tmp_path_factory,
        chunk_size=CHUNK,
        dashboard_history_interval=0.2,
        api_keys=[
            f"team-a:{KEYS['team-a']}",
            f"team-b:{KEYS['team-b']}",
            f"ops:{KEYS['ops']}:admin",
        ],
    )


def http(api: LiveServer, name: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {KEYS[name]}"} if name else {}
    return httpx.Client(base_url=api.url, headers=headers, timeout=30)


def submit(api: LiveServer, name: str | None, lines: list[Any]) -> str:
    with http(api, name) as client:
        upload = client.post(
            "/v1/files", files={"file": ("in.jsonl", jsonl(lines))}, data={"purpose": "batch"}
        )
        assert upload.status_code == 200, upload.text
        batch = client.post(
            "/v1/batches",
            json={
                "input_file_id": upload.json()["id"],
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
        )
        assert batch.status_code == 200, batch.text
        return str(batch.json()["id"])


def wait_status(api: LiveServer, name: str | None, batch_id: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    with http(api, name) as client:
        while True:
            batch = client.get(f"/v1/dashboard/batches/{batch_id}").json()
            if batch["status"] == status:
                return dict(batch)
            assert time.monotonic() < deadline, batch
            time.sleep(0.1)


@pytest.fixture(scope="module")
def team_a_batch(api: LiveServer) -> str:
    """Team A's batch of 10 lines, validated into 3 queued chunks; no worker runs."""
    batch_id = submit(api, "team-a", [chat_line(i, TINY_NAME) for i in range(10)])
    wait_status(api, "team-a", batch_id, "in_progress")
    return batch_id


@pytest.mark.parametrize(
    ("accept", "redirect"),
    [
        (None, False),
        ("*/*", False),  # curl, SDKs
        ("application/json", False),
        ("application/json, text/html", False),  # a tie goes to JSON
        ("text/html;q=0.5, application/json", False),
        (BROWSER_ACCEPT, True),
        ("text/html", True),
    ],
)
def test_root_redirects_browsers_only(api: LiveServer, accept: str | None, redirect: bool) -> None:
    response = httpx.get(f"{api.url}/", headers={"Accept": accept or ""})
    assert "Accept" in response.headers["vary"]
    if redirect:
        assert response.status_code == 307
        assert response.headers["location"] == "/dashboard"
    else:
        assert response.status_code == 200
        assert response.json()["name"] == "vLLM Batch Server"
        assert response.json()["links"]["dashboard"] == "/dashboard"


def test_browser_follows_to_the_page_without_a_key(api: LiveServer, team_a_batch: str) -> None:
    with httpx.Client(base_url=api.url, follow_redirects=True) as client:
        page = client.get("/", headers={"Accept": BROWSER_ACCEPT})
        assert page.status_code == 200 and str(page.url).endswith("/dashboard")
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "connect-src 'self'" in csp
        assert team_a_batch not in page.text and "sk-dash" not in page.text  # no data in it
        assert '<script src="/dashboard/static/dashboard.js' in page.text
        detail = client.get(f"/dashboard/batches/{team_a_batch}")
        assert detail.status_code == 200 and 'data-view="batch"' in detail.text
        escaped = client.get("/dashboard/batches/%3Cimg%20src%3Dx%3E")
        assert "<img" not in escaped.text and "&lt;img src=x&gt;" in escaped.text
        for asset, kind in (("dashboard.js", "javascript"), ("dashboard.css", "text/css")):
            response = client.get(f"/dashboard/static/{asset}")
            assert response.status_code == 200 and kind in response.headers["content-type"]
        assert client.get("/dashboard/static/%2e%2e/pages.py").status_code == 404
        assert client.get("/dashboard/").url.path == "/dashboard"


@pytest.mark.parametrize(
    "path",
    [
        "/overview",
        "/batches",
        "/batches/batch_x",
        "/batches/batch_x/chunks",
        "/history",
        "/batches/batch_x/history",
    ],
)
@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_data_needs_a_key(api: LiveServer, path: str, key: str | None) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.get(f"{api.url}/v1/dashboard{path}", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_batches_are_per_key(api: LiveServer, team_a_batch: str) -> None:
    with http(api, "team-a") as a, http(api, "team-b") as b, http(api, "ops") as ops:
        mine = a.get("/v1/dashboard/batches").json()["data"]
        assert [x["id"] for x in mine if x["id"] == team_a_batch] == [team_a_batch]
        assert mine[0]["owner"] is None  # key names of owners: admins only
        assert all(x["id"] != team_a_batch for x in b.get("/v1/dashboard/batches").json()["data"])
        for path in ("", "/chunks"):
            missing = b.get(f"/v1/dashboard/batches/{team_a_batch}{path}")
            assert missing.status_code == 404, missing.text
        everything = ops.get("/v1/dashboard/batches").json()["data"]
        assert {x["id"]: x["owner"] for x in everything}[team_a_batch] == "team-a"
        assert a.get("/v1/dashboard/overview").json()["batches"].get("in_progress", 0) >= 1
        assert b.get("/v1/dashboard/overview").json()["batches"].get("in_progress", 0) == 0
        assert b.get("/v1/dashboard/overview").json()["viewer"] == {
            "name": "team-b",
            "admin": False,
            "keys_required": True,
        }


def test_queue_per_model(api: LiveServer, team_a_batch: str) -> None:
    with http(api, "team-b") as b:
        overview = b.get("/v1/dashboard/overview").json()
    queue = {q["model"]: q for q in overview["queue"]}[TINY_NAME]
    assert queue["queued_chunks"] + queue["running_chunks"] >= 3
    assert queue["queued_lines"] + queue["running_lines"] >= 10 and queue["batches"] >= 1
    assert overview["this_process"] == {"enabled": False}
    assert overview["models"] == [TINY_NAME]


def claim_and_fail_one_line(api: LiveServer, batch_id: str) -> None:
    """Act as a worker elsewhere: lease the batch's first chunk and save one error line."""

    async def work(session: Any) -> None:
        async with session.begin():
            claim = await queries.claim_chunk(
                session, owner=REMOTE_WORKER, models=[TINY_NAME], now=time.time(), lease=300
            )
            assert claim is not None and claim.chunk.batch_id == batch_id
            chunk = claim.chunk
        async with session.begin():
            line = failure_line("request-0", "invalid_request", "temperature must be >= 0")
            result = LineResult(line=0, is_error=True, data=line)
            outcome = await queries.save_chunk_results(
                session,
                batch_id=batch_id,
                chunk_id=chunk.id,
                owner=REMOTE_WORKER,
                results=[result],
                lease_until=time.time() + 300,
                now=time.time(),
            )
            assert outcome is not None and len(outcome.new) == 1

    api.db(work)


def test_owners_and_workers_only_for_admins(api: LiveServer, team_a_batch: str) -> None:
    claim_and_fail_one_line(api, team_a_batch)
    with http(api, "team-a") as a, http(api, "ops") as ops:
        own = a.get(f"/v1/dashboard/batches/{team_a_batch}/chunks").json()
        admin = ops.get(f"/v1/dashboard/batches/{team_a_batch}/chunks").json()
        assert len(own["data"]) == len(admin["data"]) == 3  # 10 lines in chunks of 4
        assert [c["lines"] for c in admin["data"]] == [4, 4, 2]
        first = admin["data"][0]
        assert first["status"] == "running" and first["attempts"] == 1
        assert first["lease_owner"] == REMOTE_WORKER and first["saved_lines"] == 1
        assert admin["owners_visible"] is True
        assert own["owners_visible"] is False
        assert all(c["lease_owner"] is None and c["lease_until"] is None for c in own["data"])
        assert own["data"][0]["saved_lines"] == 1 and own["data"][0]["status"] == "running"
        assert REMOTE_WORKER not in a.get("/v1/dashboard/overview").text
        workers = ops.get("/v1/dashboard/overview").json()["workers"]
        assert {w["id"]: w["models"] for w in workers}[REMOTE_WORKER] == [TINY_NAME]
        assert a.get("/v1/dashboard/overview").json()["active_workers"] >= 1
        # The saved error line is among the batch's first errors while it runs.
        batch = a.get(f"/v1/dashboard/batches/{team_a_batch}").json()
        assert batch["request_counts"]["failed"] == 1
        assert batch["first_errors"] == [
            {
                "line": 0,
                "custom_id": "request-0",
                "code": "invalid_request",
                "message": "temperature must be >= 0",
            }
        ]
        listed = {x["id"]: x for x in a.get("/v1/dashboard/batches").json()["data"]}
        assert listed[team_a_batch]["first_errors"] == batch["first_errors"]
        # Its timeline so far: the saved line stamped the last save; no line went to an
        # engine through a worker here, so the queue and run phases are not known yet.
        assert batch["first_line_started_at"] is None
        assert batch["created_at"] <= batch["in_progress_at"] <= batch["last_line_finished_at"]
        assert batch["phases"]["validation"] >= 0
        assert batch["phases"]["queue"] is None and batch["phases"]["run"] is None
        # ...on the dashboard only: the OpenAI batch object keeps OpenAI's fields.
        wire = a.get(f"/v1/batches/{team_a_batch}").json()
        assert not {"first_line_started_at", "last_line_finished_at", "phases"} & set(wire)


def history_of(api: LiveServer, name: str, path: str = "/v1/dashboard/history") -> Any:
    with http(api, name) as client:
        response = client.get(path)
        assert response.status_code == 200, response.text
        return response.json()


def test_history_is_per_key(api: LiveServer, team_a_batch: str) -> None:
    """Team A's queued lines and failed line are in its history and the admin's, not B's."""
    if not claimed(api, team_a_batch):  # run alone: not yet done by the test above
        claim_and_fail_one_line(api, team_a_batch)
    deadline = time.monotonic() + 30
    while True:
        own = history_of(api, "team-a")
        if own["failed_lines"] and own["failed_lines"][-1] >= 1 and len(own["t"]) >= 3:
            break
        assert time.monotonic() < deadline, own
        time.sleep(0.2)
    assert own["scope"] == "own" and own["interval"] == 0.2 and own["window"] == 3600
    assert max(own["queued_lines"]) + max(own["running_lines"]) >= 9  # 10 lines, 1 saved
    assert own["t"] == sorted(own["t"]) and own["lines_per_second"][0] is None
    assert {len(own[k]) for k in ("t", "tokens_per_second", "completed_lines")} == {len(own["t"])}
    other = history_of(api, "team-b")
    assert other["scope"] == "own" and max(other["queued_lines"] + other["running_lines"]) == 0
    admin = history_of(api, "ops")
    assert admin["scope"] == "all" and admin["failed_lines"][-1] >= own["failed_lines"][-1]
    # The batch's own series: from zero when it started, up to its failed line.
    points = history_of(api, "team-a", f"/v1/dashboard/batches/{team_a_batch}/history")
    assert points["batch_id"] == team_a_batch and points["total"] == 10 and points["sampled"]
    assert points["completed"][0] == points["failed"][0] == 0 and points["failed"][-1] == 1
    with http(api, "team-b") as b:
        missing = b.get(f"/v1/dashboard/batches/{team_a_batch}/history")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def claimed(api: LiveServer, batch_id: str) -> bool:
    with http(api, "ops") as ops:
        return bool(ops.get(f"/v1/dashboard/batches/{batch_id}").json()["request_counts"]["failed"])


def test_openapi_declares_bearer_auth(api: LiveServer) -> None:
    """The schema asks for the key on every /v1 operation; the edge's 401 is unchanged."""
    schema = httpx.get(f"{api.url}/openapi.json", timeout=60).json()
    assert schema["components"]["securitySchemes"] == {
        "bearerAuth": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key: `Authorization: Bearer <key>`.",
        }
    }
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            required = operation.get("security")
            assert required == ([{"bearerAuth": []}] if path.startswith("/v1/") else None), path
    assert "/v1/dashboard/history" in schema["paths"]
    refused = httpx.get(f"{api.url}/v1/batches")
    assert refused.status_code == 401
    assert refused.json() == {
        "error": {
            "message": "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }


def test_docs_page_is_served_locally(api: LiveServer) -> None:
    page = httpx.get(f"{api.url}/docs", timeout=30)
    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "cdn" not in page.text.lower() and "<script>" not in page.text
    assert '<script src="/dashboard/static/swagger-ui-bundle.js' in page.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "uPlot.iife.min.js", "api-docs.js"):
        assert httpx.get(f"{api.url}/dashboard/static/{asset}").status_code == 200, asset


def test_validation_errors_are_first_errors(api: LiveServer) -> None:
    lines = [chat_line(0, TINY_NAME), chat_line(0, TINY_NAME)]  # duplicate custom_id
    batch_id = submit(api, "team-b", lines)
    batch = wait_status(api, "team-b", batch_id, "failed")
    assert batch["first_errors"][0]["code"] == "duplicate_custom_id"
    assert batch["first_errors"][0]["line"] is not None


def test_pagination(api: LiveServer, team_a_batch: str) -> None:
    extra = submit(api, "team-a", [chat_line(0, TINY_NAME)])
    with http(api, "team-a") as a:
        first = a.get("/v1/dashboard/batches", params={"limit": 1}).json()
        assert [x["id"] for x in first["data"]] == [extra] and first["has_more"]
        rest = a.get("/v1/dashboard/batches", params={"limit": 100, "after": extra}).json()
        assert team_a_batch in [x["id"] for x in rest["data"]] and not rest["has_more"]
        assert a.get("/v1/dashboard/batches", params={"limit": 0}).status_code == 400


@pytest.fixture(scope="module")
def keyless(
    loop_thread: LoopThread, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    data = tmp_path_factory.mktemp("dash-keyless")
    settings = engine_settings(
        tiny_model,
        database_url=f"sqlite+aiosqlite:///{data / 'db.sqlite'}",
        data_dir=data,
        worker=False,
    )
    yield from start_server(loop_thread, settings, None)


def test_without_keys_everyone_sees_owners(keyless: LiveServer) -> None:
    batch_id = submit(keyless, None, [chat_line(i, TINY_NAME) for i in range(3)])
    wait_status(keyless, None, batch_id, "in_progress")
    claim_and_fail_one_line(keyless, batch_id)
    with http(keyless, None) as client:
        overview = client.get("/v1/dashboard/overview").json()
        assert overview["viewer"] == {"name": None, "admin": True, "keys_required": False}
        assert [w["id"] for w in overview["workers"]] == [REMOTE_WORKER]
        chunks = client.get(f"/v1/dashboard/batches/{batch_id}/chunks").json()
        assert chunks["owners_visible"] and chunks["data"][0]["lease_owner"] == REMOTE_WORKER
        assert client.get("/v1/dashboard/batches/batch_missing/chunks").status_code == 404
