"""Settings: env prefix, legacy env names, database URL resolution, model specs."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_batch.config import DEFAULT_MODEL_NAME, ModelSpec, Settings, normalize_database_url

LEGACY = [
    "DATABASE_URL",
    "POSTGRES_HOST",
    "POSTGRES_DB",
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "POSTGRES_PORT",
    "CHUNK_SIZE",
    "GPU_MEMORY_UTILIZATION",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in LEGACY:
        monkeypatch.delenv(name, raising=False)


def test_defaults_are_embedded_sqlite(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.resolved_database_url == f"sqlite+aiosqlite:///{tmp_path / 'vllm-batch.db'}"
    assert settings.port == 4080 and settings.worker is True
    assert settings.served_model_names == [DEFAULT_MODEL_NAME]


def test_prefixed_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_BATCH_PORT", "9999")
    monkeypatch.setenv("VLLM_BATCH_MODELS", "a=/m/a, /m/b")
    monkeypatch.setenv("VLLM_BATCH_API_KEY", "k")
    monkeypatch.setenv("VLLM_BATCH_CHUNK_SIZE", "77")
    settings = Settings()
    assert settings.port == 9999 and settings.api_key == "k" and settings.chunk_size == 77
    assert settings.model_specs == [ModelSpec("a", "/m/a"), ModelSpec("/m/b", "/m/b")]


def test_legacy_env_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHUNK_SIZE", "123")
    monkeypatch.setenv("GPU_MEMORY_UTILIZATION", "0.5")
    monkeypatch.setenv("POSTGRES_HOST", "db")
    monkeypatch.setenv("POSTGRES_DB", "batches")
    monkeypatch.setenv("POSTGRES_USER", "u")
    monkeypatch.setenv("POSTGRES_PASSWORD", "p")
    settings = Settings()
    assert settings.chunk_size == 123 and settings.gpu_memory_utilization == 0.5
    assert settings.resolved_database_url == "postgresql+asyncpg://u:p@db:5432/batches"
    monkeypatch.setenv("DATABASE_URL", "postgresql://x@h/d")
    assert Settings().resolved_database_url == "postgresql+asyncpg://x@h/d"


def test_normalize_database_url() -> None:
    assert normalize_database_url("postgres://a/b") == "postgresql+asyncpg://a/b"
    assert normalize_database_url("sqlite:///x.db") == "sqlite+aiosqlite:///x.db"
    assert normalize_database_url("postgresql+asyncpg://a/b") == "postgresql+asyncpg://a/b"


def test_model_spec_parse() -> None:
    assert ModelSpec.parse("name=/p") == ModelSpec("name", "/p")
    assert ModelSpec.parse("/only/path") == ModelSpec("/only/path", "/only/path")
    with pytest.raises(ValueError):
        ModelSpec.parse("=/p")
