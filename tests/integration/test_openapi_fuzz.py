"""Property-based fuzz of the published OpenAPI schema (schemathesis) over real HTTP.

A live in-process server without a worker, on SQLite and PostgreSQL, once with an API key
(sent with every request) and once without: no generated request may get a 5xx.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from tests.conftest import LiveServer, LoopThread, engine_settings, start_server

FUZZ_KEY = "sk-fuzz-key"
MAX_EXAMPLES = 80


@pytest.fixture(scope="module", params=["with-key", "without-key"])
def fuzz_server(
    request: pytest.FixtureRequest,
    loop_thread: LoopThread,
    tiny_model: Path,
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    settings = engine_settings(
        tiny_model,
        database_url=database_url,
        data_dir=tmp_path_factory.mktemp("fuzz-data"),
        worker=False,
        api_key=FUZZ_KEY if request.param == "with-key" else None,
        max_upload_bytes=100_000,
    )
    yield from start_server(loop_thread, settings, None)


def test_no_server_errors(fuzz_server: LiveServer) -> None:
    """Every operation, ``MAX_EXAMPLES`` generated requests each: never a 5xx."""
    key = fuzz_server.settings.api_key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    api_schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    for operation in operations:
        strategy = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(
            GenerationMode.NEGATIVE
        )

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
