"""Property-based fuzz of the published OpenAPI schema (schemathesis) over real HTTP.

A live in-process server without a worker, on SQLite and PostgreSQL, once with an API key
(sent with every request) and once without: no generated request may get a 5xx.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from tests.conftest import TINY_NAME, LiveServer, LoopThread, api_only_server
from tests.helpers import chat_line, jsonl

FUZZ_KEY = "sk-fuzz-key"
MAX_EXAMPLES = 50


@pytest.fixture(scope="module", params=["with-key", "without-key"])
def fuzz_server(
    request: pytest.FixtureRequest,
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
        api_key=FUZZ_KEY if request.param == "with-key" else None,
        max_upload_bytes=100_000,
    )


def seed_objects(server: LiveServer, headers: dict[str, str]) -> dict[str, str]:
    """A stored batch file and a batch on it, so the fuzz also reaches real objects."""
    content = jsonl([chat_line(i, TINY_NAME) for i in range(3)])
    with httpx.Client(base_url=server.base_url, headers=headers) as http:
        uploaded = http.post(
            "/files", files={"file": ("seed.jsonl", content)}, data={"purpose": "batch"}
        )
        assert uploaded.status_code == 200, uploaded.text
        file_id = uploaded.json()["id"]
        batch = http.post(
            "/batches",
            json={
                "input_file_id": file_id,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
        )
        assert batch.status_code == 200, batch.text
    return {"file_id": file_id, "batch_id": batch.json()["id"]}


def test_no_server_errors(fuzz_server: LiveServer) -> None:
    """Every operation, ``MAX_EXAMPLES`` generated requests each: never a 5xx."""
    key = fuzz_server.settings.api_key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    api_schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    # The schema declares bearer auth; the key (or its absence) is sent explicitly here.
    api_schema.config.generation.update(with_security_parameters=False)
    known = seed_objects(fuzz_server, headers)
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    for operation in operations:
        strategy = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(
            GenerationMode.NEGATIVE
        )
        real = {name: value for name, value in known.items() if "{" + name + "}" in operation.path}
        if real:  # also hit stored objects, not only unknown ids
            strategy |= operation.as_strategy(path_parameters=real)

        @given(case=strategy)
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            phases=[Phase.explicit, Phase.generate],
        )
        def fuzz(case: Any) -> None:
            response = case.call(base_url=fuzz_server.url, headers=headers, timeout=30)
            statuses[response.status_code] += 1
            case.validate_response(response, checks=[not_a_server_error])

        try:
            fuzz()
        except Exception as exc:  # collect all operations' failures, then report them
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
    # The fuzz reached the handlers: successes and validation errors, not only 401s.
    assert statuses[200] > 0 and statuses[400] + statuses[404] > 0, statuses
    assert statuses[401] == 0, statuses
    print(f"fuzz statuses: {dict(sorted(statuses.items()))}")
