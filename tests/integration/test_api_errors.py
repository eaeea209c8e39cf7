"""Bad input over real HTTP, on SQLite and PostgreSQL, local and S3 storage: every case
gets a specific OpenAI-style error, and nothing already stored is lost or corrupted.

The server here runs without a worker (no engine needed): batches stay queued.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import TINY_NAME, LiveServer, LoopThread, api_only_server
from tests.helpers import chat_line, jsonl, wait_for_batch
from tests.s3_fixtures import S3Server, local_or_s3, s3_server  # noqa: F401

MAX_REQUESTS = 20
MAX_BYTES = 20_000


@pytest.fixture(scope="module", params=["local", "s3"])
def storage_url(request: pytest.FixtureRequest, s3_server: S3Server) -> Iterator[str | None]:  # noqa: F811
    """Every test here runs on local storage and on S3 (moto's server over real HTTP)."""
    yield from local_or_s3(request.param, s3_server, "api")


@pytest.fixture(scope="module")
def api(
    loop_thread: LoopThread,
    tiny_model: Path,
    database_url: str,
    storage_url: str | None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    yield from api_only_server(
        loop_thread,
        tiny_model,
        database_url,
        tmp_path_factory,
        storage_url=storage_url,
        max_requests_per_batch=MAX_REQUESTS,
        max_upload_bytes=MAX_BYTES,
    )


@pytest.fixture(scope="module")
def client(api: LiveServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=api.base_url, api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def keeper(client: OpenAI) -> tuple[str, bytes]:
    """A file stored before all the bad input; checked intact at the end of the module."""
    content = jsonl([chat_line(i, TINY_NAME) for i in range(3)])
    return client.files.create(file=("keep.jsonl", content), purpose="batch").id, content


def upload(client: OpenAI, content: bytes, purpose: str = "batch") -> Any:
    return client.files.create(file=("input.jsonl", content), purpose=purpose)  # type: ignore[arg-type]


def create(
    client: OpenAI, file_id: str, endpoint: str = "/v1/chat/completions", **kwargs: Any
) -> Any:
    return client.batches.create(
        input_file_id=file_id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window=kwargs.pop("completion_window", "24h"),
        **kwargs,
    )


def failed_batch_errors(client: OpenAI, lines: list[Any]) -> list[dict[str, Any]]:
    """Upload ``lines``, create a batch, wait for ``failed`` and return its errors."""
    batch = create(client, upload(client, jsonl(lines)).id)
    final = wait_for_batch(client, batch.id, timeout=30, statuses={"failed", "in_progress"})
    assert final.status == "failed", final
    assert final.failed_at is not None
    return [e.model_dump() for e in final.errors.data]


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def test_keeper_stored(keeper: tuple[str, bytes]) -> None:
    assert keeper[0].startswith("file-")


def test_malformed_json_line_rejected_at_upload(client: OpenAI) -> None:
    content = jsonl([chat_line(0, TINY_NAME)]) + b'{"custom_id": "x", oops}\n'
    with pytest.raises(openai.BadRequestError) as exc:
        upload(client, content)
    error = error_of(exc.value)
    assert "line 2" in error["message"] and error["param"] == "file"
    assert error["code"] == "invalid_jsonl"


def test_non_object_line_rejected_at_upload(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        upload(client, b"[1, 2]\n")
    assert "line 1 must be a JSON object" in error_of(exc.value)["message"]


def test_empty_file_rejected(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        upload(client, b"\n\n")
    assert error_of(exc.value)["code"] == "empty_file"


def test_too_large_rejected_with_413(client: OpenAI, api: LiveServer) -> None:
    big = jsonl([chat_line(i, TINY_NAME, "x" * 500) for i in range(60)])
    assert len(big) > MAX_BYTES
    with pytest.raises(openai.APIStatusError) as exc:
        upload(client, big)
    assert exc.value.status_code == 413
    assert error_of(exc.value)["code"] == "file_too_large"
    # A body without Content-Length (chunked) is cut off while streaming, too.
    boundary = "vbtestboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n'
            "Content-Type: application/jsonl\r\n\r\n"
        ).encode()
        + big
        + f"\r\n--{boundary}--\r\n".encode()
    )
    chunked = httpx.post(
        f"{api.base_url}/files",
        content=iter([body[:1000], body[1000:]]),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert chunked.status_code == 413, chunked.text


def test_wrong_purpose(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        upload(client, jsonl([chat_line(0, TINY_NAME)]), purpose="banana")
    assert error_of(exc.value)["param"] == "purpose"
    other = upload(client, b"not json at all", purpose="user_data")
    with pytest.raises(openai.BadRequestError) as exc:
        create(client, other.id)
    assert "purpose 'batch'" in error_of(exc.value)["message"]


def test_missing_and_duplicate_custom_id(client: OpenAI) -> None:
    lines = [chat_line(0, TINY_NAME), chat_line(1, TINY_NAME), chat_line(1, TINY_NAME)]
    del lines[0]["custom_id"]
    errors = failed_batch_errors(client, lines)
    assert [(e["code"], e["line"], e["param"]) for e in errors] == [
        ("missing_required_parameter", 1, "custom_id"),
        ("duplicate_custom_id", 3, "custom_id"),
    ]


def test_wrong_method_and_url(client: OpenAI) -> None:
    lines = [chat_line(0, TINY_NAME), chat_line(1, TINY_NAME), chat_line(2, TINY_NAME)]
    lines[1]["method"] = "GET"
    lines[2]["url"] = "/v1/nope"
    errors = failed_batch_errors(client, lines)
    assert [(e["code"], e["line"]) for e in errors] == [("invalid_method", 2), ("invalid_url", 3)]


def test_endpoint_mismatch(client: OpenAI) -> None:
    batch = create(
        client, upload(client, jsonl([chat_line(0, TINY_NAME)])).id, endpoint="/v1/completions"
    )
    final = wait_for_batch(client, batch.id, timeout=30, statuses={"failed", "in_progress"})
    assert final.status == "failed"
    assert final.errors.data[0].code == "mismatched_endpoint"
    assert final.errors.data[0].line == 1


def test_unsupported_endpoint(client: OpenAI) -> None:
    file_id = upload(client, jsonl([chat_line(0, TINY_NAME)])).id
    with pytest.raises(openai.BadRequestError) as exc:
        create(client, file_id, endpoint="/v1/moderations")
    assert error_of(exc.value)["param"] == "endpoint"


def test_unknown_model(client: OpenAI) -> None:
    errors = failed_batch_errors(client, [chat_line(0, "gpt-17")])
    assert errors[0]["code"] == "model_not_found" and "gpt-17" in errors[0]["message"]


def test_two_models_in_one_file(client: OpenAI, tiny_model: Path) -> None:
    lines = [chat_line(0, TINY_NAME), chat_line(1, TINY_NAME), chat_line(2, "other")]
    errors = failed_batch_errors(client, lines)
    assert errors[0]["line"] == 3


def test_empty_model_name(client: OpenAI) -> None:
    line = chat_line(1, TINY_NAME)
    line["body"]["model"] = ""
    errors = failed_batch_errors(client, [chat_line(0, TINY_NAME), line])
    assert errors[0]["code"] == "missing_required_parameter" and errors[0]["line"] == 2


def test_too_many_lines(client: OpenAI) -> None:
    lines = [chat_line(i, TINY_NAME, "hi", max_tokens=1) for i in range(MAX_REQUESTS + 1)]
    errors = failed_batch_errors(client, lines)
    assert errors[-1]["code"] == "too_many_requests"
    assert str(MAX_REQUESTS) in errors[-1]["message"]


def test_batch_on_missing_or_deleted_file(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        create(client, "file-doesnotexist")
    assert error_of(exc.value)["param"] == "input_file_id"
    file_id = upload(client, jsonl([chat_line(0, TINY_NAME)])).id
    deleted = client.files.delete(file_id)
    assert deleted.deleted is True and deleted.id == file_id
    with pytest.raises(openai.NotFoundError):
        create(client, file_id)


def test_metadata_limits(client: OpenAI) -> None:
    file_id = upload(client, jsonl([chat_line(0, TINY_NAME)])).id
    for metadata in ({"k": "v" * 513}, {"k" * 65: "v"}, {f"k{i}": "v" for i in range(17)}):
        with pytest.raises(openai.BadRequestError) as exc:
            create(client, file_id, metadata=metadata)
        assert error_of(exc.value)["param"] == "metadata"


def test_completion_window(client: OpenAI) -> None:
    file_id = upload(client, jsonl([chat_line(0, TINY_NAME)])).id
    with pytest.raises(openai.BadRequestError) as exc:
        create(client, file_id, completion_window="soon")
    assert error_of(exc.value)["param"] == "completion_window"
    batch = create(client, file_id, completion_window="7d")
    assert batch.expires_at == batch.created_at + 7 * 86400


def test_missing_body_fields(api: LiveServer) -> None:
    response = httpx.post(f"{api.base_url}/batches", json={"endpoint": "/v1/chat/completions"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "input_file_id"


def test_unknown_ids_are_404(client: OpenAI, api: LiveServer) -> None:
    for call in (
        lambda: client.files.retrieve("file-nope"),
        lambda: client.files.content("file-nope"),
        lambda: client.files.delete("file-nope"),
        lambda: client.batches.retrieve("batch_nope"),
        lambda: client.batches.cancel("batch_nope"),
    ):
        with pytest.raises(openai.NotFoundError) as exc:
            call()
        assert "nope" in error_of(exc.value)["message"]
    assert httpx.get(f"{api.base_url}/batches/batch_nope/results").status_code == 404
    assert httpx.get(f"{api.url}/v1/nothing-here").json()["error"]["type"]


def test_output_requested_before_it_exists(client: OpenAI, api: LiveServer) -> None:
    batch = create(client, upload(client, jsonl([chat_line(0, TINY_NAME)])).id)
    response = httpx.get(f"{api.base_url}/batches/{batch.id}/results")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "output_not_ready"
    assert client.batches.retrieve(batch.id).output_file_id is None


def test_cancel_queued_batch(client: OpenAI) -> None:
    batch = create(client, upload(client, jsonl([chat_line(i, TINY_NAME) for i in range(5)])).id)
    wait_for_batch(client, batch.id, timeout=30, statuses={"in_progress"})
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    final = wait_for_batch(client, batch.id, timeout=30)
    assert final.status == "cancelled" and final.cancelled_at is not None
    assert final.request_counts.total == 5 and final.request_counts.completed == 0
    assert final.output_file_id is None
    # Cancelling again returns the cancelled batch; cancelling a failed batch is a 409.
    assert client.batches.cancel(batch.id).status == "cancelled"
    failed = create(client, upload(client, jsonl([chat_line(0, "unknown-model")])).id)
    assert wait_for_batch(client, failed.id, timeout=30).status == "failed"
    with pytest.raises(openai.ConflictError) as exc:
        client.batches.cancel(failed.id)
    assert error_of(exc.value)["code"] == "invalid_state"


def test_delete_input_of_running_batch_is_409(client: OpenAI) -> None:
    file_id = upload(client, jsonl([chat_line(0, TINY_NAME)])).id
    batch = create(client, file_id)
    with pytest.raises(openai.ConflictError):
        client.files.delete(file_id)
    client.batches.cancel(batch.id)
    wait_for_batch(client, batch.id, timeout=30)
    assert client.files.delete(file_id).deleted


def test_files_list_and_pagination(client: OpenAI, api: LiveServer) -> None:
    ids = [upload(client, jsonl([chat_line(i, TINY_NAME)])).id for i in range(3)]
    newest = client.files.list(purpose="batch", limit=2, order="desc")
    assert [f.id for f in newest.data] == ids[::-1][:2]
    raw = httpx.get(
        f"{api.base_url}/files", params={"limit": 2, "order": "asc", "after": ids[0]}
    ).json()
    assert [f["id"] for f in raw["data"]] == ids[1:]
    assert raw["has_more"] is False and raw["object"] == "list"
    assert all(f.purpose == "batch" for f in client.files.list(purpose="batch"))
    # a purpose no file can have (the schema checks purposes) lists nothing, as before
    unknown = httpx.get(f"{api.base_url}/files", params={"purpose": "4"})
    assert unknown.status_code == 200 and unknown.json()["data"] == []


def test_keeper_intact_after_bad_input(client: OpenAI, keeper: tuple[str, bytes]) -> None:
    file_id, content = keeper
    assert client.files.retrieve(file_id).bytes == len(content)
    assert client.files.content(file_id).content == content
    lines = [json.loads(x) for x in content.splitlines()]
    assert [line["custom_id"] for line in lines] == ["request-0", "request-1", "request-2"]


def test_expired_files_are_swept(client: OpenAI, api: LiveServer) -> None:
    from sqlalchemy import update

    from vllm_batch.batches.store.rows import FileRow

    upload = client.files.create(
        file=("in.jsonl", jsonl([chat_line(0, TINY_NAME)])),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert upload.expires_at == upload.created_at + 3600
    storage = api.app.state.ctx.storage
    assert storage.exists(f"files/{upload.id}")

    async def backdate(session: Any) -> None:
        async with session.begin():
            await session.execute(
                update(FileRow)
                .where(FileRow.id == upload.id)
                .values(expires_at=upload.created_at - 1)
            )

    api.db(backdate)
    deadline = time.monotonic() + 15
    while storage.exists(f"files/{upload.id}"):
        assert time.monotonic() < deadline, "expired file was not swept"
        time.sleep(0.2)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(upload.id)


def test_file_expiry_bounds(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(
            file=("in.jsonl", jsonl([chat_line(0, TINY_NAME)])),
            purpose="batch",
            expires_after={"anchor": "created_at", "seconds": 5},
        )
    assert error_of(exc.value)["param"] == "expires_after.seconds"
