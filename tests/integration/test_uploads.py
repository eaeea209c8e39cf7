"""The Uploads API over real HTTP (SQLite and PostgreSQL; local and S3 storage): a file sent
in parts with the official SDK becomes a file that runs as a batch, parts join in the
order given, and every misuse gets an OpenAI-style error."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from tests.conftest import (
    TINY_NAME,
    LiveServer,
    LoopThread,
    api_only_server,
    engine_settings,
    start_server,
)
from tests.doc_blocks import blocks_run_by
from tests.helpers import chat_line, jsonl, parse_jsonl, wait_for_batch
from tests.s3_fixtures import S3Server, local_or_s3, s3_server  # noqa: F401
from vllm_batch.batches.store import queries
from vllm_batch.batches.store.rows import UploadRow
from vllm_batch.batches.uploads import part_key, sweep_uploads
from vllm_batch.protocol.ids import now

THIS = "tests/integration/test_uploads.py"
PART_LIMIT = 4096
KEYS = {"team-a": "sk-aaaa", "team-b": "sk-bbbb", "ops": "sk-admin"}


@pytest.fixture(scope="module", params=["local", "s3"])
def storage_url(request: pytest.FixtureRequest, s3_server: S3Server) -> Iterator[str | None]:  # noqa: F811
    yield from local_or_s3(request.param, s3_server, "uploads")


@pytest.fixture(scope="module")
def api(
    loop_thread: LoopThread,
    tiny_model: Path,
    database_url: str,
    storage_url: str | None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    """Per-key ownership on."""
    yield from api_only_server(
        loop_thread,
        tiny_model,
        database_url,
        tmp_path_factory,
        storage_url=storage_url,
        max_upload_part_bytes=PART_LIMIT,
        max_chunked_upload_bytes=100_000,
        api_keys=[
            f"team-a:{KEYS['team-a']}",
            f"team-b:{KEYS['team-b']}",
            f"ops:{KEYS['ops']}:admin",
        ],
    )


@pytest.fixture(scope="module")
def server(
    loop_thread: LoopThread,
    tiny_engine: Any,
    tiny_model: Path,
    database_url: str,
    storage_url: str | None,
    api: LiveServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    """The engine-backed server on ``api``'s database keeps its blobs where ``api`` does:
    its housekeeping sweeps ``api``'s uploads too, and with other storage it would drop
    their part rows while deleting their blobs where they are not."""
    settings = engine_settings(
        tiny_model,
        database_url=database_url,
        data_dir=tmp_path_factory.mktemp("data"),
        storage_url=storage_url or f"file://{api.settings.data_dir}",
        chunk_size=16,
    )
    yield from start_server(loop_thread, settings, tiny_engine)


@pytest.fixture(scope="module")
def clients(api: LiveServer) -> Iterator[dict[str, OpenAI]]:
    made = {
        name: OpenAI(base_url=api.base_url, api_key=key, max_retries=0)
        for name, key in KEYS.items()
    }
    yield made
    for c in made.values():
        c.close()


@pytest.fixture(scope="module")
def client(clients: dict[str, OpenAI]) -> OpenAI:
    return clients["team-a"]


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def expect_error(status: int, call: Any) -> dict[str, Any]:
    with pytest.raises(openai.APIStatusError) as exc:
        call()
    assert exc.value.status_code == status, exc.value.response.text
    return error_of(exc.value)


def new_upload(client: OpenAI, size: int, purpose: str = "batch") -> Any:
    upload = client.uploads.create(
        bytes=size,
        filename="big.jsonl",
        mime_type="text/jsonl",
        purpose=purpose,  # type: ignore[arg-type]
    )
    assert upload.status == "pending" and upload.file is None
    return upload


def split(content: bytes, pieces: int) -> list[bytes]:
    """``content`` cut into ``pieces`` nearly equal parts (cuts fall inside lines)."""
    step = -(-len(content) // pieces)
    return [content[i : i + step] for i in range(0, len(content), step)]


def part_rows(api: LiveServer, upload_id: str) -> list[Any]:
    return list(api.db(lambda session: queries.upload_parts(session, upload_id)))


def batch_lines(count: int) -> bytes:
    return jsonl([chat_line(i, TINY_NAME, max_tokens=3) for i in range(count)])


# ---------------------------------------------------------------- with a real engine


def test_sdk_chunked_upload_runs_as_a_batch(server: LiveServer, tmp_path: Path) -> None:
    content = batch_lines(12)
    path = tmp_path / "requests.jsonl"
    path.write_bytes(content)
    with OpenAI(base_url=server.base_url, api_key="none", max_retries=0) as client:
        upload = client.uploads.upload_file_chunked(
            file=path,
            mime_type="text/jsonl",
            purpose="batch",
            part_size=len(content) // 4 + 1,  # 4 parts, each cut inside a line
            md5=hashlib.md5(content).hexdigest(),
        )
        assert upload.id.startswith("upload_") and upload.object == "upload"
        assert upload.status == "completed" and upload.bytes == len(content)
        assert upload.filename == "requests.jsonl" and upload.purpose == "batch"
        assert upload.expires_at > upload.created_at
        assert upload.file is not None and upload.file.bytes == len(content)
        assert client.files.retrieve(upload.file.id).filename == "requests.jsonl"
        assert client.files.content(upload.file.id).content == content
        assert part_rows(server, upload.id) == []
        batch = client.batches.create(
            input_file_id=upload.file.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        final = wait_for_batch(client, batch.id, timeout=180)
        assert final.status == "completed", final
        assert final.request_counts is not None
        assert (final.request_counts.total, final.request_counts.completed) == (12, 12)
        assert final.output_file_id is not None
        output = parse_jsonl(client.files.content(final.output_file_id).text)
        assert sorted(line["custom_id"] for line in output) == sorted(
            f"request-{i}" for i in range(12)
        )


def readme_snippet() -> str:
    """The Uploads example of docs/api.md."""
    [block] = blocks_run_by(THIS, "python")
    return block.code


def test_readme_upload_example(
    server: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The docs' Uploads example, as written (only the port changes)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "requests.jsonl").write_bytes(batch_lines(3))
    port = server.url.rsplit(":", 1)[1]
    code = readme_snippet().replace("127.0.0.1:4080", f"127.0.0.1:{port}")
    scope: dict[str, Any] = {}
    exec(compile(code, "docs/api.md", "exec"), scope)
    client = scope["client"]
    final = wait_for_batch(client, scope["batch"].id, timeout=180)
    assert final.status == "completed" and final.request_counts.completed == 3
    client.close()


# ---------------------------------------------------------------- the API alone


def test_parts_sent_out_of_order_join_in_the_order_given(client: OpenAI) -> None:
    content = batch_lines(6)
    pieces = split(content, 3)
    upload = new_upload(client, len(content))
    ids = {}
    for index in (2, 0, 1):
        part = client.uploads.parts.create(upload.id, data=pieces[index])
        assert part.id.startswith("part_") and part.object == "upload.part"
        assert part.upload_id == upload.id
        ids[index] = part.id
    done = client.uploads.complete(upload.id, part_ids=[ids[0], ids[1], ids[2]])
    assert done.status == "completed" and done.file is not None
    assert done.file.purpose == "batch" and done.file.filename == "big.jsonl"
    assert client.files.content(done.file.id).content == content


def test_unlisted_parts_are_left_out_and_deleted(client: OpenAI, api: LiveServer) -> None:
    content = batch_lines(2)
    upload = new_upload(client, len(content))
    used = client.uploads.parts.create(upload.id, data=content).id
    spare = client.uploads.parts.create(upload.id, data=b"spare bytes").id
    done = client.uploads.complete(upload.id, part_ids=[used])
    assert client.files.content(done.file.id).content == content
    storage = api.app.state.ctx.storage
    assert part_rows(api, upload.id) == []
    assert not storage.exists(part_key(upload.id, used))
    assert not storage.exists(part_key(upload.id, spare))


def test_cancel_deletes_the_parts(client: OpenAI, api: LiveServer) -> None:
    upload = new_upload(client, 100)
    ids = [client.uploads.parts.create(upload.id, data=b"x" * 10).id for _ in range(2)]
    storage = api.app.state.ctx.storage
    assert all(storage.exists(part_key(upload.id, part_id)) for part_id in ids)
    cancelled = client.uploads.cancel(upload.id)
    assert cancelled.status == "cancelled" and cancelled.file is None
    assert cancelled.id == upload.id and cancelled.bytes == 100
    assert part_rows(api, upload.id) == []
    assert not any(storage.exists(part_key(upload.id, part_id)) for part_id in ids)
    for call in (
        lambda: client.uploads.parts.create(upload.id, data=b"more"),
        lambda: client.uploads.complete(upload.id, part_ids=ids),
        lambda: client.uploads.cancel(upload.id),
    ):
        error = expect_error(400, call)
        assert error["code"] == "upload_not_pending" and "cancelled" in error["message"]


def test_completed_upload_takes_no_more_parts(client: OpenAI) -> None:
    content = batch_lines(1)
    upload = new_upload(client, len(content))
    part = client.uploads.parts.create(upload.id, data=content)
    client.uploads.complete(upload.id, part_ids=[part.id])
    for call in (
        lambda: client.uploads.parts.create(upload.id, data=b"more"),
        lambda: client.uploads.complete(upload.id, part_ids=[part.id]),
        lambda: client.uploads.cancel(upload.id),
    ):
        error = expect_error(400, call)
        assert error["code"] == "upload_not_pending" and "completed" in error["message"]


def test_unknown_upload_is_404(client: OpenAI) -> None:
    for call in (
        lambda: client.uploads.parts.create("upload_nope", data=b"x"),
        lambda: client.uploads.complete("upload_nope", part_ids=["part_x"]),
        lambda: client.uploads.cancel("upload_nope"),
    ):
        error = expect_error(404, call)
        assert error["code"] == "not_found" and "upload_nope" in error["message"]


def test_other_keys_cannot_touch_an_upload(clients: dict[str, OpenAI]) -> None:
    a, b, admin = clients["team-a"], clients["team-b"], clients["ops"]
    content = batch_lines(2)
    upload = new_upload(a, len(content))
    first = a.uploads.parts.create(upload.id, data=content[:10])
    for call in (
        lambda: b.uploads.parts.create(upload.id, data=b"x"),
        lambda: b.uploads.complete(upload.id, part_ids=[first.id]),
        lambda: b.uploads.cancel(upload.id),
    ):
        assert expect_error(404, call)["code"] == "not_found"
    second = admin.uploads.parts.create(upload.id, data=content[10:])
    done = a.uploads.complete(upload.id, part_ids=[first.id, second.id])
    assert a.files.content(done.file.id).content == content
    assert expect_error(404, lambda: b.files.retrieve(done.file.id))["code"] == "not_found"


def test_total_must_match_the_declared_bytes(client: OpenAI) -> None:
    content = batch_lines(2)
    upload = new_upload(client, len(content) + 1)
    part = client.uploads.parts.create(upload.id, data=content)
    error = expect_error(400, lambda: client.uploads.complete(upload.id, part_ids=[part.id]))
    assert error["code"] == "bytes_mismatch" and error["param"] == "part_ids"
    assert str(len(content)) in error["message"]
    assert client.uploads.cancel(upload.id).status == "cancelled"  # still pending


def test_unknown_repeated_or_no_part_ids(client: OpenAI) -> None:
    content = batch_lines(1)
    other = new_upload(client, 5)
    foreign = client.uploads.parts.create(other.id, data=b"12345").id
    upload = new_upload(client, len(content))
    part = client.uploads.parts.create(upload.id, data=content).id
    for part_ids, code in (
        (["part_nope"], "part_not_found"),
        ([foreign], "part_not_found"),  # a part of another upload
        ([part, part], "duplicate_part"),
        ([], "invalid_value"),
        ([f"part_{i}" for i in range(10_001)], "invalid_value"),
    ):
        error = expect_error(
            400, lambda ids=part_ids: client.uploads.complete(upload.id, part_ids=ids)
        )
        assert (error["code"], error["param"]) == (code, "part_ids"), error


def test_part_over_the_limit_is_413(client: OpenAI, api: LiveServer) -> None:
    upload = new_upload(client, 100_000)
    # Just over: passes the edge's allowance for form overhead, refused while stored.
    error = expect_error(
        413, lambda: client.uploads.parts.create(upload.id, data=b"x" * (PART_LIMIT + 1))
    )
    assert (error["code"], error["param"]) == ("part_too_large", "data")
    assert str(PART_LIMIT) in error["message"]
    # Far over: refused at the edge from its Content-Length, before the body is read.
    big = httpx.post(
        f"{api.base_url}/uploads/{upload.id}/parts",
        files={"data": ("part", b"x" * (PART_LIMIT + 100_000))},
        headers={"Authorization": f"Bearer {KEYS['team-a']}"},
    )
    assert big.status_code == 413 and big.json()["error"]["code"] == "part_too_large"
    assert part_rows(api, upload.id) == []
    assert (
        expect_error(400, lambda: client.uploads.parts.create(upload.id, data=b""))["code"]
        == "empty_part"
    )


def test_expired_upload(client: OpenAI, api: LiveServer) -> None:
    content = batch_lines(1)
    upload = new_upload(client, len(content))
    part = client.uploads.parts.create(upload.id, data=content).id

    async def age(session: AsyncSession) -> None:
        async with session.begin():
            await session.execute(
                update(UploadRow).where(UploadRow.id == upload.id).values(expires_at=now() - 1)
            )

    api.db(age)
    for call in (
        lambda: client.uploads.parts.create(upload.id, data=b"x"),
        lambda: client.uploads.complete(upload.id, part_ids=[part]),
        lambda: client.uploads.cancel(upload.id),
    ):
        error = expect_error(400, call)
        assert error["code"] == "upload_expired" and upload.id in error["message"]
    api.loop_thread.run(sweep_uploads(api.app.state.ctx))
    row = api.db(lambda session: queries.get_upload(session, upload.id))
    assert row.status == "expired"
    assert part_rows(api, upload.id) == []
    assert not api.app.state.ctx.storage.exists(part_key(upload.id, part))


def test_bad_line_gets_the_same_error_as_a_file_upload(client: OpenAI) -> None:
    lines = [chat_line(i, TINY_NAME) for i in range(5)]
    content = jsonl(lines[:3]) + b'{"custom_id": "x", oops}\n' + jsonl(lines[3:])
    as_file = expect_error(
        400, lambda: client.files.create(file=("big.jsonl", content), purpose="batch")
    )
    assert "line 4" in as_file["message"] and as_file["code"] == "invalid_jsonl"
    upload = new_upload(client, len(content))
    ids = [client.uploads.parts.create(upload.id, data=piece).id for piece in split(content, 3)]
    as_upload = expect_error(400, lambda: client.uploads.complete(upload.id, part_ids=ids))
    assert as_upload == as_file
    empty = new_upload(client, 3)
    blank = client.uploads.parts.create(empty.id, data=b"\n\n\n").id
    error = expect_error(400, lambda: client.uploads.complete(empty.id, part_ids=[blank]))
    assert error["code"] == "empty_file"


def test_md5_is_checked(client: OpenAI) -> None:
    content = batch_lines(2)
    upload = new_upload(client, len(content))
    part = client.uploads.parts.create(upload.id, data=content).id
    error = expect_error(
        400, lambda: client.uploads.complete(upload.id, part_ids=[part], md5="0" * 32)
    )
    assert (error["code"], error["param"]) == ("md5_mismatch", "md5")
    done = client.uploads.complete(upload.id, part_ids=[part], md5=hashlib.md5(content).hexdigest())
    assert done.status == "completed"


def test_other_purposes_are_not_checked_as_jsonl(client: OpenAI) -> None:
    data = bytes(range(256)).replace(b"\n", b"") * 20  # binary, no line breaks, 2 parts
    upload = new_upload(client, len(data), purpose="user_data")
    ids = [client.uploads.parts.create(upload.id, data=piece).id for piece in split(data, 2)]
    done = client.uploads.complete(upload.id, part_ids=ids)
    assert done.file is not None and done.file.purpose == "user_data"
    assert client.files.content(done.file.id).content == data


def test_file_expiry_comes_from_expires_after(client: OpenAI) -> None:
    content = batch_lines(1)
    upload = client.uploads.create(
        bytes=len(content),
        filename="x.jsonl",
        mime_type="text/jsonl",
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 7200},
    )
    part = client.uploads.parts.create(upload.id, data=content).id
    file = client.uploads.complete(upload.id, part_ids=[part]).file
    assert file is not None and file.expires_at == file.created_at + 7200


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"purpose": "banana"}, "purpose"),
        ({"bytes": 0}, "bytes"),
        ({"bytes": 100_001}, "bytes"),
        ({"filename": "a\nb"}, "filename"),
        ({"mime_type": ""}, "mime_type"),
        ({"expires_after": {"anchor": "created_at", "seconds": 5}}, "expires_after.seconds"),
    ],
)
def test_create_checks_its_fields(client: OpenAI, change: dict[str, Any], param: str) -> None:
    fields: dict[str, Any] = {
        "bytes": 10,
        "filename": "a.jsonl",
        "mime_type": "text/jsonl",
        "purpose": "batch",
        **change,
    }
    assert expect_error(400, lambda: client.uploads.create(**fields))["param"] == param
