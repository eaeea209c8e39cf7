"""The label_studio handler against a real Label Studio (``make label-studio`` installs it).

One server per module, on a free loopback port, with its own data directory (a copy of the
migrated template database the Makefile prepares, so it starts in seconds). Strict prediction
validation is switched on, so predictions that do not fit the labeling config are rejected.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from vllm_batch.config import Settings
from vllm_batch.handlers.label_studio import LabelStudioError, LabelStudioHandler, TokenAuth
from vllm_batch.handlers.results import BatchInfo, ResultStream
from vllm_batch.storage.local import LocalStorage

REPO = Path(__file__).resolve().parents[2]
LS_VENV = Path(os.environ.get("LABEL_STUDIO_VENV", REPO / ".venv-label-studio"))
MODEL = "SmolLM2-135M-Instruct"
LABEL_CONFIG = """<View>
  <Header value="$custom_id"/>
  <Text name="answer" value="$answer"/>
  <TextArea name="review" toName="answer" editable="true" maxSubmissions="1"/>
</View>"""
START_TIMEOUT = 180.0


@dataclass
class LabelStudio:
    url: str
    token: str  # legacy token
    pat: str  # personal access token (a JWT refresh token)
    start_seconds: float

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Token {self.token}"}, timeout=30
        )

    def new_project(self, title: str) -> int:
        with self.client() as client:
            response = client.post(
                "/api/projects/", json={"title": title, "label_config": LABEL_CONFIG}
            )
            assert response.status_code == 201, response.text
            return int(response.json()["id"])

    def tasks(self, project: int) -> list[dict[str, Any]]:
        with self.client() as client:
            response = client.get(
                "/api/tasks/", params={"project": project, "page_size": 1000, "fields": "all"}
            )
            assert response.status_code == 200, response.text
            return list(response.json()["tasks"])

    def predictions(self, project: int) -> list[dict[str, Any]]:
        with self.client() as client:
            response = client.get("/api/predictions/", params={"project": project})
            assert response.status_code == 200, response.text
            return list(response.json())

    def delete_task(self, task_id: int) -> None:
        with self.client() as client:
            assert client.delete(f"/api/tasks/{task_id}/").status_code == 204


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudio]:
    binary = LS_VENV / "bin" / "label-studio"
    if not binary.exists():
        pytest.fail(
            f"Label Studio is not installed at {LS_VENV}: run `make label-studio` "
            "(`make install-test` does it too)",
            pytrace=False,
        )
    data_dir = tmp_path_factory.mktemp("label-studio")
    template = LS_VENV / "template" / "label_studio.sqlite3"
    if template.exists():  # else the server migrates a new database (~30 s)
        shutil.copy(template, data_dir / "label_studio.sqlite3")
    port = _free_port()
    token = secrets.token_hex(20)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(data_dir),
        "LANG": "C.UTF-8",
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "LOG_LEVEL": "WARNING",
        # reject predictions that do not fit the labeling config (HTTP 400), not just log them
        "fflag_feat_utc_210_prediction_validation_15082025": "true",
    }
    command = [
        str(binary),
        "start",
        "--no-browser",
        "--data-dir",
        str(data_dir),
        "--internal-host",
        "127.0.0.1",
        "--port",
        str(port),
        "--username",
        "admin@example.com",
        "--password",
        secrets.token_hex(12),
        "--user-token",
        token,
        "--enable-legacy-api-token",
    ]
    log_path = data_dir / "server.log"
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_until_up(process, url, token, log_path)
        start_seconds = time.monotonic() - started
        logging.getLogger(__name__).warning("Label Studio started in %.1f s", start_seconds)
        response = httpx.post(f"{url}/api/token/", headers={"Authorization": f"Token {token}"})
        assert response.status_code == 201, response.text
        yield LabelStudio(url, token, response.json()["token"], start_seconds)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _wait_until_up(process: subprocess.Popen[bytes], url: str, token: str, log: Path) -> None:
    """Until the API answers our token (the user is created just before the server listens)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            pytest.fail(f"Label Studio exited with {process.returncode}:\n{tail}", pytrace=False)
        try:
            response = httpx.get(
                f"{url}/api/projects/", headers={"Authorization": f"Token {token}"}, timeout=2
            )
            if response.status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:]
    pytest.fail(f"Label Studio did not answer within {START_TIMEOUT:.0f} s:\n{tail}", pytrace=False)


# ------------------------------------------------------------------ a finished batch


def _success(batch_id: str, index: int) -> dict[str, Any]:
    return {
        "id": f"batch_req_{index}",
        "custom_id": f"req-{index}",
        "response": {
            "status_code": 200,
            "request_id": f"{batch_id}-r{index}",
            "body": {
                "id": f"chatcmpl-{index}",
                "object": "chat.completion",
                "model": MODEL,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"Answer number {index}."},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
            },
        },
        "error": None,
    }


ERRORS = [
    {
        "id": "batch_req_e1",
        "custom_id": "req-bad-1",
        "response": {
            "status_code": 400,
            "request_id": "r-e1",
            "body": {"error": {"message": "prompt too long", "type": "invalid_request_error"}},
        },
        "error": None,
    },
    {
        "id": "batch_req_e2",
        "custom_id": "req-bad-2",
        "response": None,
        "error": {"code": "batch_expired", "message": "not run before the window ended"},
    },
]


def _stream(tmp_path: Path, batch_id: str, successes: int = 7) -> ResultStream:
    storage = LocalStorage(tmp_path / "blobs")
    lines = {
        f"{batch_id}/output.jsonl": [_success(batch_id, i) for i in range(successes)],
        f"{batch_id}/errors.jsonl": ERRORS,
    }
    for key, rows in lines.items():
        with storage.open_write(key) as handle:
            handle.write(b"".join(json.dumps(row).encode() + b"\n" for row in rows))
    info = BatchInfo(
        id=batch_id,
        status="completed",
        endpoint="/v1/chat/completions",
        model=MODEL,
        metadata={},
        output_file_id=f"file-{batch_id}-out",
        error_file_id=f"file-{batch_id}-err",
        output_key=f"{batch_id}/output.jsonl",
        error_key=f"{batch_id}/errors.jsonl",
    )
    return ResultStream(storage, info)


def _settings(ls: LabelStudio, project: int | None, key: str, page_size: int = 3) -> Settings:
    return Settings(
        label_studio_url=ls.url,
        label_studio_api_key=key,
        label_studio_project_id=project,
        label_studio_page_size=page_size,
    )


def _page_sizes(caplog: pytest.LogCaptureFixture) -> list[int]:
    return [
        int(record.args[0])  # type: ignore[index]
        for record in caplog.records
        if record.getMessage().startswith("label_studio: imported a page of")
    ]


def _assert_landed(ls: LabelStudio, project: int, batch_id: str, indexes: range) -> None:
    tasks = [t for t in ls.tasks(project) if t["data"]["batch_id"] == batch_id]
    by_custom_id = {t["data"]["custom_id"]: t for t in tasks}
    assert len(tasks) == len(by_custom_id) == len(indexes)
    assert set(by_custom_id) == {f"req-{i}" for i in indexes}
    for i in indexes:
        assert by_custom_id[f"req-{i}"]["data"] == {
            "answer": f"Answer number {i}.",
            "custom_id": f"req-{i}",
            "batch_id": batch_id,
            "model": MODEL,
            "request_id": f"{batch_id}-r{i}",
        }
    task_ids = {t["id"]: t["data"]["custom_id"] for t in tasks}
    predictions = [p for p in ls.predictions(project) if p["task"] in task_ids]
    assert len(predictions) == len(indexes)
    for prediction in predictions:
        index = task_ids[prediction["task"]].removeprefix("req-")
        assert prediction["model_version"] == MODEL
        assert prediction["result"] == [
            {
                "from_name": "review",
                "to_name": "answer",
                "type": "textarea",
                "value": {"text": [f"Answer number {index}."]},
            }
        ]


# ------------------------------------------------------------------ tests


def test_imports_successes_in_pages_once(
    label_studio: LabelStudio, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="vllm_batch.handlers.label_studio")
    project = label_studio.new_project("batch results")
    stream = _stream(tmp_path, "batch_one")
    assert len(stream) == 9

    # personal access token (JWT, exchanged for short-lived access tokens)
    handler = LabelStudioHandler(_settings(label_studio, project, label_studio.pat))
    assert handler.name() == "label_studio"
    assert handler.enabled({})
    assert handler.handle("batch_one", stream, {}) is True
    assert _page_sizes(caplog) == [3, 3, 1]
    _assert_landed(label_studio, project, "batch_one", range(7))

    # a retry (here with the legacy token) imports nothing and duplicates nothing
    caplog.clear()
    retry = LabelStudioHandler(_settings(label_studio, project, label_studio.token))
    assert retry.handle("batch_one", stream, {}) is True
    assert _page_sizes(caplog) == []
    assert "0 tasks imported into project" in caplog.text
    assert "7 already there" in caplog.text
    _assert_landed(label_studio, project, "batch_one", range(7))
    assert len(label_studio.tasks(project)) == 7
    assert len(label_studio.predictions(project)) == 7


def test_retry_completes_a_partial_import_and_keeps_other_batches(
    label_studio: LabelStudio, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="vllm_batch.handlers.label_studio")
    project = label_studio.new_project("partial import")
    handler = LabelStudioHandler(_settings(label_studio, project, label_studio.token))
    first = _stream(tmp_path / "a", "batch_a")
    second = _stream(tmp_path / "b", "batch_b", successes=4)  # same custom_ids, other batch
    assert handler.handle("batch_a", first, {})
    assert handler.handle("batch_b", second, {})

    # as if the first run had died after two of its tasks were lost
    lost = [t["id"] for t in label_studio.tasks(project) if t["data"]["batch_id"] == "batch_a"][:2]
    for task_id in lost:
        label_studio.delete_task(task_id)
    caplog.clear()
    assert handler.handle("batch_a", first, {})
    assert _page_sizes(caplog) == [2]
    _assert_landed(label_studio, project, "batch_a", range(7))
    _assert_landed(label_studio, project, "batch_b", range(4))
    assert len(label_studio.tasks(project)) == 11


def test_metadata_chooses_the_project(label_studio: LabelStudio, tmp_path: Path) -> None:
    default = label_studio.new_project("default project")
    chosen = label_studio.new_project("chosen project")
    handler = LabelStudioHandler(_settings(label_studio, default, label_studio.token))
    metadata = {"label_studio_project_id": str(chosen)}
    assert handler.handle("batch_meta", _stream(tmp_path, "batch_meta", 2), metadata)
    _assert_landed(label_studio, chosen, "batch_meta", range(2))
    assert label_studio.tasks(default) == []


def test_http_errors_raise_with_the_reason(label_studio: LabelStudio, tmp_path: Path) -> None:
    project = label_studio.new_project("errors")
    stream = _stream(tmp_path, "batch_err", 2)

    wrong_tags = LabelStudioHandler(
        _settings(label_studio, project, label_studio.token), from_name="nope"
    )
    with pytest.raises(
        LabelStudioError, match=r"POST /api/projects/\d+/import failed: HTTP 400"
    ) as e:
        wrong_tags.handle("batch_err", stream, {})
    assert "Prediction validation failed" in str(e.value)
    assert "'from_name' 'nope' not found in configuration" in str(e.value)
    assert label_studio.tasks(project) == []

    bad_token = LabelStudioHandler(_settings(label_studio, project, "not-a-token"))
    with pytest.raises(LabelStudioError, match="HTTP 401"):
        bad_token.handle("batch_err", stream, {})

    bad_pat = LabelStudioHandler(_settings(label_studio, project, label_studio.pat[:-4] + "AAAA"))
    with pytest.raises(LabelStudioError, match="rejected the personal access token"):
        bad_pat.handle("batch_err", stream, {})

    no_project = LabelStudioHandler(_settings(label_studio, 999_999, label_studio.token))
    with pytest.raises(LabelStudioError, match="HTTP 404"):
        no_project.handle("batch_err", stream, {})


def test_expired_access_token_is_refreshed(label_studio: LabelStudio) -> None:
    auth = TokenAuth(label_studio.url, label_studio.pat)
    auth.access = "expired"
    with httpx.Client(base_url=label_studio.url, auth=auth) as client:
        assert client.get("/api/projects/").status_code == 200
    assert auth.access not in (None, "expired")


def test_enabled_needs_url_key_and_project() -> None:
    full = Settings(
        label_studio_url="http://127.0.0.1:1",
        label_studio_api_key="k",
        label_studio_project_id=3,
    )
    assert LabelStudioHandler(full).enabled({})
    for missing in ("label_studio_url", "label_studio_api_key", "label_studio_project_id"):
        settings = full.model_copy(update={missing: None})
        assert not LabelStudioHandler(settings).enabled({})
    no_project = full.model_copy(update={"label_studio_project_id": None})
    assert LabelStudioHandler(no_project).enabled({"label_studio_project_id": 5})
    assert not LabelStudioHandler(full).enabled({"label_studio_project_id": "seven"})
