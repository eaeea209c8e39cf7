"""The HTTP edge over real HTTP, on SQLite and PostgreSQL: API key before the body, byte
caps on what is actually received, the Host guard, docs switch and input bounds.

Servers here run without a worker (no engine needed). Every refusal is checked for
OpenAI's error shape and for leaving stored data unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from fastapi import Request
from sqlalchemy import func, select

from tests.conftest import TINY_NAME, LiveServer, LoopThread, engine_settings, start_server
from tests.helpers import chat_line, jsonl
from vllm_batch.api.auth import Principal
from vllm_batch.batches.store.rows import BatchRow, FileRow

KEY = "sk-edge-test-key"
MAX_UPLOAD = 20_000
MAX_BODY = 64 * 1024
AUTH = {"Authorization": f"Bearer {KEY}"}
BOUNDARY = "edgeboundary"
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("edge-data")


@pytest.fixture(scope="module")
def api(
    loop_thread: LoopThread, tiny_model: Path, database_url: str, data_dir: Path
) -> Iterator[LiveServer]:
    """A server with an API key, a small upload limit and a small body cap."""
    settings = engine_settings(
        tiny_model,
        database_url=database_url,
        data_dir=data_dir,
        worker=False,
        api_key=KEY,
        max_upload_bytes=MAX_UPLOAD,
        max_request_body_bytes=MAX_BODY,
        cors_origins=[ORIGIN],
    )
    yield from start_server(loop_thread, settings, None)


@pytest.fixture(scope="module")
def open_api(
    loop_thread: LoopThread, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server without an API key (Host guard on) and with docs turned off."""
    settings = engine_settings(
        tiny_model,
        data_dir=tmp_path_factory.mktemp("open-data"),
        worker=False,
        allowed_hosts=["batch.internal", "Other.Example"],
        docs_enabled=False,
    )
    yield from start_server(loop_thread, settings, None)


@pytest.fixture(scope="module")
def http(api: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.base_url, headers=AUTH, timeout=60) as client:
        yield client


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert response.headers["x-request-id"]
    return dict(body["error"])


def counts(api: LiveServer) -> tuple[int, int]:
    """(files, batches) rows in the server's database."""

    async def count(session: Any) -> tuple[int, int]:
        files = await session.scalar(select(func.count()).select_from(FileRow))
        batches = await session.scalar(select(func.count()).select_from(BatchRow))
        return int(files), int(batches)

    result: tuple[int, int] = api.db(count)
    return result


def blobs(data_dir: Path) -> list[str]:
    return sorted(p.name for p in (data_dir / "files").glob("*")) if data_dir.exists() else []


def multipart_head(filename: str = "in.jsonl") -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/jsonl\r\n\r\n"
    ).encode()


def multipart_stream(total: int, piece: int = 1 << 20) -> Iterator[bytes]:
    """A multipart upload of ``total`` content bytes, streamed (chunked, no Content-Length)."""
    yield multipart_head()
    line = json.dumps(chat_line(0, TINY_NAME, "x" * 200)).encode() + b"\n"
    block = line * (piece // len(line) + 1)
    sent = 0
    while sent < total:
        yield block
        sent += len(block)
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def upload(http: httpx.Client, content: bytes, filename: str = "in.jsonl") -> httpx.Response:
    return http.post(
        "/files", files={"file": (filename, content)}, data={"purpose": "batch"}, timeout=60
    )


@pytest.fixture(scope="module")
def file_id(http: httpx.Client) -> str:
    response = upload(http, jsonl([chat_line(0, TINY_NAME)]))
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


# ------------------------------------------------------------------ API key


def test_v1_requires_the_key_and_health_stays_open(api: LiveServer) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": KEY},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": f"Bearer {KEY}x"},
    ):
        error = error_of(httpx.get(f"{api.base_url}/files", headers=headers), 401)
        assert error["code"] == "invalid_api_key"
    assert httpx.get(f"{api.url}/health").status_code == 200
    assert httpx.get(f"{api.base_url}/models", headers=AUTH).status_code == 200
    assert httpx.get(f"{api.base_url}/files", headers=AUTH).status_code == 200


def test_principal_is_resolved_by_the_edge(api: LiveServer) -> None:
    seen: list[Any] = []

    @api.app.get("/v1/_edge_probe")
    async def probe(request: Request) -> dict[str, str]:
        seen.append(request.state.principal)
        return {"ok": "yes"}

    try:
        assert httpx.get(f"{api.base_url}/_edge_probe", headers=AUTH).status_code == 200
        assert httpx.get(f"{api.base_url}/_edge_probe").status_code == 401
    finally:
        api.app.router.routes.pop()
    assert seen == [Principal("default", admin=True)]


def test_unauthenticated_post_is_refused_with_an_unread_body(api: LiveServer) -> None:
    before = counts(api)
    response = httpx.post(
        f"{api.base_url}/files",
        content=multipart_stream(50 * MAX_UPLOAD),
        headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"},
    )
    assert error_of(response, 401)["code"] == "invalid_api_key"
    assert counts(api) == before


def test_cors_preflight_needs_no_key_and_refusals_carry_cors(api: LiveServer) -> None:
    preflight = httpx.options(
        f"{api.base_url}/files",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    refused = httpx.get(f"{api.base_url}/files", headers={"Origin": ORIGIN})
    assert error_of(refused, 401)["code"] == "invalid_api_key"
    assert refused.headers["access-control-allow-origin"] == ORIGIN


def test_request_id_is_echoed_only_when_sane(api: LiveServer) -> None:
    given = httpx.get(f"{api.url}/health", headers={"X-Request-Id": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    odd = httpx.get(f"{api.url}/health", headers={"X-Request-Id": "a b" + "x" * 300})
    assert odd.headers["x-request-id"].startswith("req_")


# ------------------------------------------------------------------ byte caps


def test_content_length_over_the_cap_is_refused_at_once(api: LiveServer) -> None:
    big = b"{" + b" " * (MAX_BODY + 10) + b"}"
    error = error_of(httpx.post(f"{api.base_url}/batches", content=big, headers=AUTH), 413)
    assert error["code"] == "request_too_large" and str(MAX_BODY) in error["message"]


def test_chunked_json_over_the_cap_is_cut_off(api: LiveServer) -> None:
    before = counts(api)

    def body() -> Iterator[bytes]:
        yield b'{"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "metadata": {"a": "'
        for _ in range(4 * MAX_BODY // 4096):
            yield b"x" * 4096
        yield b'"}, "completion_window": "24h"}'

    response = httpx.post(f"{api.base_url}/batches", content=body(), headers=AUTH)
    assert error_of(response, 413)["code"] == "request_too_large"
    assert counts(api) == before


def test_authenticated_chunked_upload_over_the_limit(
    api: LiveServer, http: httpx.Client, data_dir: Path, file_id: str
) -> None:
    before, stored = counts(api), blobs(data_dir)
    response = http.post(
        "/files",
        content=multipart_stream(5 * 1024 * 1024),
        headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"},
    )
    error = error_of(response, 413)
    assert error["code"] == "file_too_large" and error["param"] == "file"
    assert counts(api) == before
    assert blobs(data_dir) == stored
    assert http.get(f"/files/{file_id}").status_code == 200


def test_upload_within_the_limit_still_works(http: httpx.Client) -> None:
    content = jsonl([chat_line(i, TINY_NAME) for i in range(3)])
    stream = iter([multipart_head(), content, f"\r\n--{BOUNDARY}--\r\n".encode()])
    response = http.post(
        "/files",
        content=stream,
        headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"},
    )
    assert response.status_code == 200, response.text
    assert http.get(f"/files/{response.json()['id']}/content").content == content


# ------------------------------------------------------------------ Host guard


@pytest.mark.parametrize(
    "host", ["localhost", "127.0.0.1", "[::1]", "batch.internal", "other.example"]
)
def test_allowed_hosts_are_served(open_api: LiveServer, host: str) -> None:
    port = open_api.url.rsplit(":", 1)[1]
    for value in (host, f"{host}:{port}"):
        response = httpx.get(f"{open_api.base_url}/models", headers={"Host": value})
        assert response.status_code == 200, (value, response.text)


def test_foreign_host_is_refused_without_a_key(open_api: LiveServer) -> None:
    for host in ("evil.example", "evil.example:80", "localhost.evil.example", ""):
        error = error_of(httpx.get(f"{open_api.url}/health", headers={"Host": host}), 400)
        assert error["code"] == "invalid_host" and error["param"] == "host"
    before = httpx.get(f"{open_api.base_url}/files").json()["data"]
    response = httpx.post(
        f"{open_api.base_url}/files",
        files={"file": ("a.jsonl", jsonl([chat_line(0, TINY_NAME)]))},
        data={"purpose": "batch"},
        headers={"Host": "attacker.example"},
    )
    assert error_of(response, 400)["code"] == "invalid_host"
    assert httpx.get(f"{open_api.base_url}/files").json()["data"] == before


def test_host_guard_is_off_with_a_key_or_a_star(
    api: LiveServer, loop_thread: LoopThread, tiny_model: Path, tmp_path: Path
) -> None:
    response = httpx.get(f"{api.base_url}/models", headers={**AUTH, "Host": "api.example"})
    assert response.status_code == 200
    settings = engine_settings(tiny_model, data_dir=tmp_path, worker=False, allowed_hosts=["*"])
    server = start_server(loop_thread, settings, None)
    live = next(server)
    try:
        response = httpx.get(f"{live.base_url}/models", headers={"Host": "anything.example"})
        assert response.status_code == 200
    finally:
        server.close()


def test_allowed_hosts_env_is_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_batch.api.edge import allowed_hosts
    from vllm_batch.config import Settings

    monkeypatch.setenv("VLLM_BATCH_ALLOWED_HOSTS", "a.example, B.example ,")
    monkeypatch.setenv("VLLM_BATCH_HOST", "10.0.0.5")
    assert allowed_hosts(Settings()) == {
        "localhost",
        "127.0.0.1",
        "::1",
        "10.0.0.5",
        "a.example",
        "b.example",
    }


# ------------------------------------------------------------------ docs switch


def test_docs_on_by_default(api: LiveServer) -> None:
    # The first /openapi.json builds the whole schema: more than httpx's 5 s on a busy machine.
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{api.url}{path}", timeout=60).status_code == 200
    assert "/v1/batches" in httpx.get(f"{api.url}/openapi.json", timeout=60).json()["paths"]


def test_docs_can_be_turned_off(open_api: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_batch.config import Settings

    for path in ("/docs", "/redoc", "/openapi.json"):
        error = error_of(httpx.get(f"{open_api.url}{path}"), 404)
        assert error["type"] == "invalid_request_error"
    monkeypatch.setenv("VLLM_BATCH_DOCS_ENABLED", "false")
    assert Settings().docs_enabled is False


# ------------------------------------------------------------------ bounds


@pytest.mark.parametrize(
    "window",
    ["24h\n", "1s", "59m", "0h", "31d", "721h", "99999999999999999999999h", "٢٤h", " 24h", "24"],
)
def test_completion_window_bounds(
    api: LiveServer, http: httpx.Client, file_id: str, window: str
) -> None:
    before = counts(api)
    response = http.post(
        "/batches",
        json={
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": window,
        },
    )
    error = error_of(response, 400)
    assert error["param"] == "completion_window" and error["code"] == "invalid_value"
    assert counts(api) == before


def test_completion_window_edges_accepted(http: httpx.Client, file_id: str) -> None:
    for window, seconds in (("1h", 3600), ("24h", 86400), ("60m", 3600), ("30d", 30 * 86400)):
        response = http.post(
            "/batches",
            json={
                "input_file_id": file_id,
                "endpoint": "/v1/chat/completions",
                "completion_window": window,
            },
        )
        assert response.status_code == 200, response.text
        batch = response.json()
        assert batch["expires_at"] - batch["created_at"] == seconds
        assert http.post(f"/batches/{batch['id']}/cancel").status_code == 200


@pytest.mark.parametrize(
    "priority", [str(2**31), str(2**63), str(-(2**31) - 1), "1e3", "", "٣", "9" * 400]
)
def test_priority_must_fit_32_bits(
    api: LiveServer, http: httpx.Client, file_id: str, priority: str
) -> None:
    before = counts(api)
    response = http.post(
        "/batches",
        json={
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": {"priority": priority},
        },
    )
    error = error_of(response, 400)
    assert error["param"] == "metadata" and "priority" in error["message"]
    assert counts(api) == before


def test_priority_extremes_are_stored(http: httpx.Client, file_id: str) -> None:
    for priority in (2**31 - 1, -(2**31)):
        response = http.post(
            "/batches",
            json={
                "input_file_id": file_id,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
                "metadata": {"priority": str(priority)},
            },
        )
        assert response.status_code == 200, response.text
        batch = http.get(f"/batches/{response.json()['id']}").json()
        assert batch["metadata"] == {"priority": str(priority)}
        http.post(f"/batches/{batch['id']}/cancel")


def test_long_or_control_character_filenames_rejected(
    api: LiveServer, http: httpx.Client, data_dir: Path
) -> None:
    before, stored = counts(api), blobs(data_dir)
    error = error_of(upload(http, jsonl([chat_line(0, TINY_NAME)]), filename="a" * 1025), 400)
    assert error["param"] == "file" and "1024" in error["message"]
    raw = (  # httpx would percent-encode the control character; send it as is
        multipart_head("bad\x01name\x7f.jsonl")
        + jsonl([chat_line(0, TINY_NAME)])
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    response = http.post(
        "/files",
        content=raw,
        headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"},
    )
    error = error_of(response, 400)
    assert error["param"] == "file" and error["code"] == "invalid_value"
    assert counts(api) == before and blobs(data_dir) == stored
    ok = upload(http, jsonl([chat_line(0, TINY_NAME)]), filename="a" * 1024)
    assert ok.status_code == 200 and ok.json()["filename"] == "a" * 1024


def test_non_latin1_filename_downloads(http: httpx.Client) -> None:
    name = "données_日本.jsonl"
    content = jsonl([chat_line(0, TINY_NAME)])
    response = upload(http, content, filename=name)
    assert response.status_code == 200, response.text
    assert response.json()["filename"] == name
    download = http.get(f"/files/{response.json()['id']}/content")
    assert download.status_code == 200 and download.content == content
    header = download.headers["content-disposition"]
    assert header.isascii()
    disposition, fallback, star = (part.strip() for part in header.split(";"))
    assert disposition == "attachment" and fallback == 'filename="donn_es___.jsonl"'
    assert star.startswith("filename*=UTF-8''")
    assert unquote(star.removeprefix("filename*=UTF-8''"), encoding="utf-8") == name


def test_deeply_nested_line_refused_at_upload(
    api: LiveServer, http: httpx.Client, data_dir: Path
) -> None:
    before, stored = counts(api), blobs(data_dir)
    deep = json.dumps(chat_line(1, TINY_NAME))[:-2].encode()  # drop the closing "}}"
    deep += b', "deep": ' + b"[" * 1000 + b"]" * 1000 + b"}}\n"
    content = jsonl([chat_line(0, TINY_NAME)]) + deep
    error = error_of(upload(http, content), 400)
    assert "line 2" in error["message"] and error["code"] == "json_too_deep"
    assert error["param"] == "file"
    shallow = chat_line(1, TINY_NAME)
    shallow["body"]["deep"] = json.loads("[" * 50 + "]" * 50)
    assert upload(http, jsonl([shallow])).status_code == 200
    assert counts(api) == (before[0] + 1, before[1])
    assert len(blobs(data_dir)) == len(stored) + 1


# ------------------------------------------------------------------ fuzz findings


def test_nul_in_the_url_is_a_400(api: LiveServer, http: httpx.Client) -> None:
    before = counts(api)
    for path in ("/files/file-%00x", "/batches?after=%00", "/files?purpose=ba%00tch"):
        error = error_of(http.get(path), 400)
        assert error["code"] == "invalid_url"
    assert error_of(http.delete("/files/file-%00"), 400)["code"] == "invalid_url"
    assert counts(api) == before


def test_unstorable_text_in_a_batch_request_is_a_400(
    api: LiveServer, http: httpx.Client, file_id: str
) -> None:
    before = counts(api)
    for field, value in (
        ("input_file_id", "\\ud800"),
        ("input_file_id", "file-\\u0000"),
        ("completion_window", "24h\\u0000"),
    ):
        body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
        body["completion_window"] = "24h"
        raw = json.dumps(body)[:-1] + f', "{field}": "{value}"}}'
        response = http.post(
            "/batches", content=raw.encode(), headers={"content-type": "application/json"}
        )
        error = error_of(response, 400)
        assert error["param"] == field, error
    metadata = json.dumps({"input_file_id": file_id, "endpoint": "/v1/chat/completions"})
    raw = metadata[:-1] + ', "completion_window": "24h", "metadata": {"k": "\\udfff"}}'
    response = http.post(
        "/batches", content=raw.encode(), headers={"content-type": "application/json"}
    )
    assert error_of(response, 400)["param"].startswith("metadata")
    assert counts(api) == before
