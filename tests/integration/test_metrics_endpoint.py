"""``/metrics`` access: the on/off switch (and its legacy env names) and who may scrape."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer, LoopThread, start_server
from tests.metrics_helpers import parse, scrape
from vllm_batch.api.app import create_app
from vllm_batch.config import Settings

KEYS = ["ops:sk-ops-admin:admin", "alice:sk-alice"]
serving = contextlib.contextmanager(
    lambda loop_thread, settings: start_server(loop_thread, settings, None)
)


def no_engine_settings(data_dir: Path, **overrides: object) -> Settings:
    return Settings(models=["m=/unused"], worker=False, data_dir=data_dir, **overrides)


@pytest.fixture(scope="module")
def keyed(
    loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    settings = no_engine_settings(tmp_path_factory.mktemp("keyed"), api_keys=KEYS)
    yield from start_server(loop_thread, settings, None)


@pytest.mark.parametrize(
    "env",
    [
        "PROMETHEUS_ENABLED",
        "VLLM_BATCH_METRICS_ENABLED",
        "VLLM_BATCH_PROMETHEUS_ENABLED",
    ],
)
async def test_switched_off_means_404(
    env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env, "false")
    settings = Settings(models=["m=/unused"], worker=False, data_dir=tmp_path)
    assert settings.metrics_enabled is False
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        assert (await client.get("/metrics")).status_code == 404
        assert (await client.get("/health")).status_code == 200


def test_on_by_default() -> None:
    assert Settings().metrics_enabled is True


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": "sk-ops-admin"}, 401),
        ({"Authorization": "Bearer sk-alice"}, 403),
    ],
    ids=["no-key", "wrong-key", "not-bearer", "non-admin-key"],
)
def test_keys_configured_needs_an_admin_key(
    keyed: LiveServer, headers: dict[str, str], status: int
) -> None:
    response = httpx.get(f"{keyed.url}/metrics", headers=headers)
    assert response.status_code == status
    assert response.json()["error"]["code"] in ("invalid_api_key", "insufficient_permissions")
    assert "vllm_batch_" not in response.text


def test_admin_key_scrapes(keyed: LiveServer) -> None:
    found = scrape(f"{keyed.url}/metrics", {"Authorization": "Bearer sk-ops-admin"})
    assert found.get("vllm_batch_database_up") == 1
    assert found.value("vllm_batch_batches", status="completed") == 0
    assert found.value("vllm_batch_queue_lines", model="m") == 0
    assert found.value("vllm_batch_deliveries", kind="webhook", status="pending") == 0


def test_public_switch_serves_without_a_key(loop_thread: LoopThread, tmp_path: Path) -> None:
    settings = no_engine_settings(tmp_path, api_keys=KEYS, metrics_public=True)
    with serving(loop_thread, settings) as server:
        assert scrape(f"{server.url}/metrics").get("vllm_batch_database_up") == 1
        # /v1 still needs a key
        assert httpx.get(f"{server.url}/v1/models").status_code == 401


def test_without_keys_anyone_local_scrapes_and_openmetrics_is_offered(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    with serving(loop_thread, no_engine_settings(tmp_path)) as server:
        assert scrape(f"{server.url}/metrics").get("vllm_batch_database_up") == 1
        response = httpx.get(
            f"{server.url}/metrics", headers={"Accept": "application/openmetrics-text"}
        )
        assert response.headers["content-type"].startswith("application/openmetrics-text")
        assert response.text.rstrip().endswith("# EOF")
        # the DNS-rebinding guard covers /metrics like every other route
        foreign = httpx.get(f"{server.url}/metrics", headers={"Host": "evil.example"})
        assert foreign.status_code == 400
        assert parse(httpx.get(f"{server.url}/metrics").text).types["vllm_batch_batches"] == (
            "gauge"
        )


# Every family docs/observability.md and the Grafana dashboard rely on.
FAMILIES = {
    "gauge": [
        "batches",
        "queue_lines",
        "queue_batches",
        "queue_chunks",
        "queue_oldest_age_seconds",
        "chunks_lease_expired",
        "deliveries",
        "database_up",
        "build_info",
        "storage_ok",
        "storage_free_bytes",
        "lines_per_second",
        "tokens_per_second",
        "engine_loaded",
        "engine_running_requests",
        "engine_waiting_requests",
        "engine_kv_cache_usage_ratio",
        "engine_prefix_cache_hit_rate",
    ],
    "counter": [
        "lines_completed",
        "lines_failed",
        "tokens",
        "chunk_claims",
        "chunk_lease_expiries",
        "chunks_done",
        "chunk_requeues",
        "chunk_leases_lost",
        "chunks_given_up",
        "db_retries",
        "storage_write_refusals",
        "finalize_storage_retries",
        "engine_loads",
        "engine_load_failures",
        "engine_restarts",
        "delivery_attempts",
        "delivery_breakers_opened",
        "http_connections_refused",
        "engine_prefix_cache_queries",
        "engine_prefix_cache_hits",
        "engine_preemptions",
    ],
    "histogram": [
        "request_latency_seconds",
        "batch_duration_seconds",
        "batch_phase_seconds",
        "delivery_attempt_seconds",
        "event_loop_lag_seconds",
    ],
}
GPU_FAMILIES = {
    f"vllm_batch_{name}"
    for name in (
        "gpu_utilization_percent",
        "gpu_memory_used_bytes",
        "gpu_memory_total_bytes",
        "gpu_temperature_celsius",
        "gpu_power_watts",
        "gpu_power_limit_watts",
        "gpu_throttled",
        "gpu_available",
        "gpu_claims_paused",
        "gpu_pauses",
        "oom_backoffs",
    )
}


def test_every_documented_family_is_exported_from_the_start(keyed: LiveServer) -> None:
    found = scrape(f"{keyed.url}/metrics", {"Authorization": "Bearer sk-ops-admin"})
    expected = {f"vllm_batch_{name}": kind for kind, names in FAMILIES.items() for name in names}
    assert {name: found.types.get(name) for name in expected} == expected
    extra = set(found.types) - set(expected)
    # The GPU guard's families (observability/gpu.py): per-GPU series exist once a GPU was
    # read (injected readings in other tests of this process; none on a machine without one).
    assert extra <= GPU_FAMILIES, f"undocumented families: {extra - GPU_FAMILIES}"
    # a served model's series exist before any work (0 unless this process ran some)
    assert found.value("vllm_batch_lines_completed_total", model="m") is not None
    assert found.value("vllm_batch_tokens_total", model="m", kind="cached") is not None
