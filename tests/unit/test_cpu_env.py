"""vLLM's CPU variables per engine: an explicit KV-cache size is not overridden by
``VLLM_CPU_KVCACHE_SPACE`` (vLLM's CPU platform applies that variable over the flag)."""

from __future__ import annotations

import os

import pytest

from vllm_batch.config import ModelSpec, Settings
from vllm_batch.engines.vllm_engine import engine_argv, set_cpu_env, set_media_env


@pytest.fixture(autouse=True)
def cpu_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with none of them set; the session's values come back after."""
    for key in (
        "VLLM_CPU_KVCACHE_SPACE",
        "VLLM_CPU_NUM_OF_RESERVED_CPU",
        "VLLM_BATCH_KV_CACHE_GIB",
    ):
        monkeypatch.setenv(key, "")  # records the value to restore
        monkeypatch.delenv(key)


def test_defaults_fill_what_is_unset() -> None:
    set_cpu_env(Settings(models=["m=/w"]))
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"


def test_a_value_set_by_the_user_is_kept() -> None:
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "4"
    set_cpu_env(Settings(models=["m=/w"]))
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "4"


def test_explicit_kv_cache_gib_removes_the_cpu_variable_and_reaches_vllm() -> None:
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"  # as `make` exports it
    settings = Settings(models=["m=/w"], kv_cache_gib=0.125)
    set_cpu_env(settings)
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ
    argv = engine_argv(ModelSpec("m", "/w"), settings)
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(128 * 1024**2)


def test_an_engine_without_it_after_one_with_it_gets_the_default_again() -> None:
    set_cpu_env(Settings(models=["m=/w"], kv_cache_gib=0.125))
    set_cpu_env(Settings(models=["m=/w"]))
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_media_redirects_are_off_unless_the_operator_set_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The media-URL guard checks the URL a line names; vLLM must not follow a redirect
    (vLLM reads the variable as ``bool(int(value))``; an engine inherits the environment)."""
    monkeypatch.delenv("VLLM_MEDIA_URL_ALLOW_REDIRECTS", raising=False)
    set_media_env()
    assert os.environ["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] == "0"
    monkeypatch.setenv("VLLM_MEDIA_URL_ALLOW_REDIRECTS", "1")
    set_media_env()
    assert os.environ["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] == "1"
