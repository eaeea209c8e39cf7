"""Per-key ownership over real HTTP (SQLite and PostgreSQL, real tiny engine): each key sees
only its own files, batches and output files; an admin key sees all; the single legacy
``api_key`` keeps working as an admin."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import TINY_NAME, LiveServer, LoopThread, engine_settings, start_server
from tests.helpers import chat_line, jsonl, wait_for_batch
from vllm_batch.api.auth import KeyConfigError, KeyRing, Principal
from vllm_batch.config import Settings

KEYS = {"team-a": "sk-aaaa", "team-b": "sk-bbbb", "ops": "sk-admin"}


@pytest.fixture(scope="module")
def api(
    loop_thread: LoopThread,
    tiny_engine: Any,
    tiny_model: Path,
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text(f"# ops can see everything\nops:{KEYS['ops']}:admin\n")
    settings = engine_settings(
        tiny_model,
        database_url=database_url,
        data_dir=tmp_path_factory.mktemp("data"),
        api_key="sk-legacy",
        api_keys=[f"team-a:{KEYS['team-a']}", f"team-b:{KEYS['team-b']}"],
        api_keys_file=keys_file,
    )
    yield from start_server(loop_thread, settings, tiny_engine)


def client_for(api: LiveServer, key: str) -> OpenAI:
    return OpenAI(base_url=api.base_url, api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def clients(api: LiveServer) -> Iterator[dict[str, OpenAI]]:
    made = {name: client_for(api, key) for name, key in KEYS.items()}
    made["legacy"] = client_for(api, "sk-legacy")
    yield made
    for c in made.values():
        c.close()


@pytest.fixture(scope="module")
def a_batch(clients: dict[str, OpenAI]) -> Any:
    a = clients["team-a"]
    content = jsonl([chat_line(i, TINY_NAME, max_tokens=3) for i in range(4)])
    upload = a.files.create(file=("a.jsonl", content), purpose="batch")
    batch = a.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    final = wait_for_batch(a, batch.id, timeout=120)
    assert final.status == "completed", final
    return final


def test_other_keys_cannot_see_files_or_batches(clients: dict[str, OpenAI], a_batch: Any) -> None:
    b = clients["team-b"]
    for call in (
        lambda: b.files.retrieve(a_batch.input_file_id),
        lambda: b.files.content(a_batch.input_file_id),
        lambda: b.files.content(a_batch.output_file_id),
        lambda: b.files.delete(a_batch.input_file_id),
        lambda: b.batches.retrieve(a_batch.id),
        lambda: b.batches.cancel(a_batch.id),
        lambda: b.batches.create(
            input_file_id=a_batch.input_file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert all(f.id not in (a_batch.input_file_id, a_batch.output_file_id) for f in b.files.list())
    assert all(batch.id != a_batch.id for batch in b.batches.list())
    # nothing b tried changed a's objects
    a = clients["team-a"]
    assert a.batches.retrieve(a_batch.id).status == "completed"
    assert a.files.retrieve(a_batch.input_file_id).id == a_batch.input_file_id


def test_owner_sees_own_objects_and_output(clients: dict[str, OpenAI], a_batch: Any) -> None:
    a = clients["team-a"]
    listed = {f.id for f in a.files.list()}
    assert {a_batch.input_file_id, a_batch.output_file_id} <= listed
    assert a_batch.id in {batch.id for batch in a.batches.list()}
    assert len(a.files.content(a_batch.output_file_id).text.splitlines()) == 4


def test_results_route_respects_ownership(api: LiveServer, a_batch: Any) -> None:
    url = f"{api.base_url}/batches/{a_batch.id}/results"
    other = httpx.get(url, headers={"Authorization": f"Bearer {KEYS['team-b']}"})
    assert other.status_code == 404
    mine = httpx.get(url, headers={"Authorization": f"Bearer {KEYS['team-a']}"})
    assert mine.status_code == 200 and len(mine.text.splitlines()) == 4


@pytest.mark.parametrize("admin", ["ops", "legacy"])
def test_admin_keys_see_everything(clients: dict[str, OpenAI], a_batch: Any, admin: str) -> None:
    b = clients["team-b"]
    b_file = b.files.create(file=("b.jsonl", jsonl([chat_line(0, TINY_NAME)])), purpose="batch")
    c = clients[admin]
    ids = {f.id for f in c.files.list()}
    assert {a_batch.input_file_id, a_batch.output_file_id, b_file.id} <= ids
    assert c.batches.retrieve(a_batch.id).id == a_batch.id
    assert c.files.content(a_batch.output_file_id).text
    assert c.files.retrieve(b_file.id).id == b_file.id


def test_unknown_key_is_refused(api: LiveServer) -> None:
    with client_for(api, "sk-nobody") as nobody, pytest.raises(openai.AuthenticationError):
        nobody.files.list()


def test_keyring_parsing(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("a:k1\n\n  # comment\nroot:k2:admin  # trailing comment\n")
    ring = KeyRing.from_settings(Settings(api_keys_file=keys_file, api_keys=["b:k3"]))
    assert ring.resolve(b"Bearer k1") == Principal("a", admin=False)
    assert ring.resolve(b"Bearer k2") == Principal("root", admin=True)
    assert ring.resolve(b"Bearer k3") == Principal("b", admin=False)
    assert ring.resolve(b"Bearer k4") is None
    assert Principal("a", admin=False).scope == "a" and Principal("r", admin=True).scope is None
    for bad in (["a"], ["a:"], ["a:k:root"], ["bad name:k"], ["a:k", "a:k2"], ["a:k", "b:k"]):
        with pytest.raises(KeyConfigError):
            KeyRing.from_settings(Settings(api_keys=bad))
    with pytest.raises(KeyConfigError) as caught:
        KeyRing.from_settings(Settings(api_keys=["x:SECRET-ONE", "x:SECRET-TWO", "y"]))
    assert "SECRET" not in str(caught.value)
    keys_file.write_text("ok:k\nbroken\n")
    with pytest.raises(KeyConfigError, match=":2"):
        KeyRing.from_settings(Settings(api_keys_file=keys_file))
    with pytest.raises(KeyConfigError, match="cannot read"):
        KeyRing.from_settings(Settings(api_keys_file=tmp_path / "missing"))


def test_service_info_counts_respect_ownership(api: LiveServer, a_batch: Any) -> None:
    def info(key: str | None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = httpx.get(f"{api.url}/", headers=headers)
        assert response.status_code == 200
        return dict(response.json())

    assert info(None)["batches"] is None  # keys are configured: no counts without one
    assert "id" not in info(KEYS["team-b"])["worker"]
    assert info(KEYS["team-b"])["batches"].get("completed", 0) == 0
    assert info(KEYS["team-a"])["batches"]["completed"] >= 1
    admin = info(KEYS["ops"])
    assert admin["batches"]["completed"] >= 1 and "id" in admin["worker"]
