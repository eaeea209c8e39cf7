"""The API on S3 storage (moto's server over real HTTP) with the real engine, via the openai
SDK, on SQLite and PostgreSQL: batches behave as on local storage, and every blob lives in
the bucket under the configured prefix.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import TINY_NAME, LiveServer, LoopThread, engine_settings, start_server
from tests.helpers import chat_line, jsonl, parse_jsonl, wait_for_batch
from tests.s3_fixtures import S3Server, s3_server  # noqa: F401
from vllm_batch.storage import S3Storage

PREFIX = "tenant/batch-data"


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server, database_url: str) -> str:  # noqa: F811
    """A fresh bucket per database backend, so each run sees only its own objects."""
    return s3_server.new_bucket("vllm-batch")


@pytest.fixture(scope="module")
def s3_api(
    s3_server: S3Server,  # noqa: F811
    bucket: str,
    loop_thread: LoopThread,
    tiny_engine: Any,
    tiny_model: Path,
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    """A live server whose storage is ``s3://<bucket>/<PREFIX>``, configured from the AWS
    environment variables (set for the module: the client is built in the app's lifespan)."""
    data_dir = tmp_path_factory.mktemp("data")
    settings = engine_settings(
        tiny_model,
        database_url=database_url,
        data_dir=data_dir,
        storage_url=f"s3://{bucket}/{PREFIX}",
        chunk_size=16,
    )
    with s3_server.aws_env():
        yield from start_server(loop_thread, settings, tiny_engine)
    assert not (data_dir / "files").exists()  # nothing went to local disk


@pytest.fixture(scope="module")
def client(s3_api: LiveServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=s3_api.base_url, api_key="unused", max_retries=0) as c:
        yield c


def objects(s3_server: S3Server, bucket: str) -> set[str]:  # noqa: F811
    return set(s3_server.keys(bucket, f"{PREFIX}/"))


def test_server_uses_s3_storage(s3_api: LiveServer, bucket: str) -> None:
    storage = s3_api.app.state.ctx.storage
    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.prefix) == (bucket, PREFIX)


def test_batch_round_trip_on_s3(
    client: OpenAI,
    s3_api: LiveServer,
    s3_server: S3Server,  # noqa: F811
    bucket: str,
) -> None:
    content = jsonl([chat_line(i, TINY_NAME) for i in range(30)])
    upload = client.files.create(file=("input.jsonl", content), purpose="batch")
    assert upload.bytes == len(content)
    input_key = f"{PREFIX}/files/{upload.id}"
    assert input_key in objects(s3_server, bucket)
    assert s3_server.get(bucket, input_key) == content
    assert client.files.content(upload.id).content == content

    created = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = wait_for_batch(client, created.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.model_dump() == {"total": 30, "completed": 30, "failed": 0}
    assert batch.error_file_id is None and batch.output_file_id is not None

    text = client.files.content(batch.output_file_id).text
    results = parse_jsonl(text)
    assert [r["custom_id"] for r in results] == [f"request-{i}" for i in range(30)]
    for result in results:
        assert result["error"] is None
        assert result["response"]["status_code"] == 200
        assert result["response"]["body"]["model"] == TINY_NAME
    direct = httpx.get(f"{s3_api.base_url}/batches/{batch.id}/results")
    assert direct.status_code == 200 and direct.text == text

    # one finalization attempt wrote batches/<id>/<attempt>/output.jsonl; nothing else is kept
    kept = [key for key in objects(s3_server, bucket) if key.startswith(f"{PREFIX}/batches/")]
    assert len(kept) == 1 and kept[0].startswith(f"{PREFIX}/batches/{batch.id}/"), kept
    output_key = kept[0]
    assert output_key.endswith("/output.jsonl")  # the empty error file is not kept
    assert s3_server.get(bucket, output_key) == text.encode()
    assert client.files.retrieve(batch.output_file_id).bytes == len(text.encode())
    assert s3_server.uploads_in_progress(bucket) == []

    assert client.files.delete(upload.id).deleted
    assert input_key not in objects(s3_server, bucket)
    assert client.files.delete(batch.output_file_id).deleted
    assert output_key not in objects(s3_server, bucket)
    with pytest.raises(openai.NotFoundError):
        client.files.content(upload.id)


@pytest.mark.parametrize(
    "content",
    [
        b'{"custom_id": "a"}\nnot json\n',
        b"[1, 2]\n",
        b"",
    ],
    ids=["malformed-line", "not-an-object", "empty"],
)
def test_rejected_upload_leaves_no_object(
    client: OpenAI,
    s3_server: S3Server,  # noqa: F811
    bucket: str,
    content: bytes,
) -> None:
    before = objects(s3_server, bucket)
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("bad.jsonl", content), purpose="batch")
    assert objects(s3_server, bucket) == before
    assert s3_server.uploads_in_progress(bucket) == []


def test_large_upload_goes_multipart_and_streams_back(
    client: OpenAI,
    s3_server: S3Server,  # noqa: F811
    bucket: str,
) -> None:
    """An upload bigger than one 8 MiB part, with a rejected line past the first part."""
    line = jsonl([chat_line(0, TINY_NAME, "x" * 900)])
    good = line * (20 * 1024 * 1024 // len(line))  # ~20 MiB: three parts
    upload = client.files.create(file=("big.jsonl", good), purpose="batch")
    key = f"{PREFIX}/files/{upload.id}"
    head = s3_server.admin.head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == len(good)
    assert head["ETag"].strip('"').endswith("-3")
    assert client.files.content(upload.id).content == good
    assert client.files.delete(upload.id).deleted

    before = objects(s3_server, bucket)
    with pytest.raises(openai.BadRequestError, match="line"):
        client.files.create(file=("bad.jsonl", good + b"oops\n"), purpose="batch")
    assert objects(s3_server, bucket) == before
    assert s3_server.uploads_in_progress(bucket) == []
