"""LoRA adapters without an engine: spec parsing, base models, batch planning, vLLM flags,
the offline guard and the CLI's checks."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from vllm_batch.cli import app
from vllm_batch.config import ModelSpec, Settings
from vllm_batch.engines.engine import EngineResult
from vllm_batch.engines.vllm_engine import engine_argv
from vllm_batch.models.adapters import (
    AdapterConfigError,
    LoraSpec,
    adapter_bases,
    max_lora_rank,
    resolve_adapters,
)
from vllm_batch.offline.runner import ServedModelGuard
from vllm_batch.pipeline.input import plan_batch


def test_parse_specs() -> None:
    assert LoraSpec.parse("sql=/a/sql") == LoraSpec("sql", "/a/sql")
    assert LoraSpec.parse(" sql = /a/sql@base ") == LoraSpec("sql", "/a/sql", "base")
    assert LoraSpec.parse("x=/a@b/c@m") == LoraSpec("x", "/a@b/c", "m")  # last @ names the base
    for bad in ("sql", "=/a", "sql=", "sql=/a@", "sql=@m"):
        with pytest.raises(AdapterConfigError, match="NAME=PATH"):
            LoraSpec.parse(bad)


def test_resolve_gives_each_adapter_a_served_base() -> None:
    assert resolve_adapters(["a=/p/a"], ["m"]) == [LoraSpec("a", "/p/a", "m")]
    both = resolve_adapters(["a=/p/a@m1", "b=/p/b@m2"], ["m1", "m2"])
    assert adapter_bases(both) == {"a": "m1", "b": "m2"}
    with pytest.raises(AdapterConfigError, match="several models"):
        resolve_adapters(["a=/p/a"], ["m1", "m2"])
    with pytest.raises(AdapterConfigError, match="base model 'x' is not served"):
        resolve_adapters(["a=/p/a@x"], ["m1"])
    with pytest.raises(AdapterConfigError, match="already used"):
        resolve_adapters(["m=/p/a"], ["m"])
    with pytest.raises(AdapterConfigError, match="already used"):
        resolve_adapters(["a=/p/a", "a=/p/b"], ["m"])


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_BATCH_MODELS", "m1=/w/1,m2=/w/2")
    monkeypatch.setenv("VLLM_BATCH_LORAS", "a=/p/a@m1, b=/p/b@m2,c=/p/c@m1")
    monkeypatch.setenv("VLLM_BATCH_MAX_LORA_RANK", "64")
    settings = Settings()
    assert adapter_bases(settings.lora_specs) == {"a": "m1", "b": "m2", "c": "m1"}
    assert [a.name for a in settings.adapters_of("m1")] == ["a", "c"]
    assert settings.max_lora_rank == 64


def write_adapter(path: Path, rank: int) -> str:
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"r": rank}))
    return str(path)


def test_rank_is_the_smallest_vllm_rank_that_fits(tmp_path: Path) -> None:
    a = LoraSpec("a", write_adapter(tmp_path / "a", 8))
    b = LoraSpec("b", write_adapter(tmp_path / "b", 20))
    assert max_lora_rank([a]) == 8
    assert max_lora_rank([a, b]) == 32
    assert max_lora_rank([LoraSpec("hub", "org/not-local")]) == 16


def test_engine_flags_only_for_the_models_adapters(tmp_path: Path) -> None:
    path = write_adapter(tmp_path / "a", 8)
    settings = Settings(models=["m1=/w/1", "m2=/w/2"], loras=[f"a={path}@m1", "b=/p/b@m1"])
    argv = engine_argv(ModelSpec("m1", "/w/1"), settings)
    tail = argv[argv.index("--enable-lora") :]
    assert tail == [
        "--enable-lora",
        "--max-lora-rank",
        "8",
        "--max-loras",
        "2",
        "--lora-modules",
        f"a={path}",
        "b=/p/b",
    ]
    assert "--enable-lora" not in engine_argv(ModelSpec("m2", "/w/2"), settings)
    capped = settings.model_copy(update={"max_loras": 1, "max_lora_rank": 64})
    argv = engine_argv(ModelSpec("m1", "/w/1"), capped)
    assert argv[argv.index("--max-lora-rank") + 1] == "64"
    assert argv[argv.index("--max-loras") + 1] == "1"


def line(custom_id: str, model: str) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return json.dumps(
        {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
    ).encode()


def plan(*models: str) -> Any:
    data = b"\n".join(line(f"r{i}", m) for i, m in enumerate(models))
    return plan_batch(
        io.BytesIO(data),
        endpoint="/v1/chat/completions",
        served_models=["m1", "m2"],
        max_requests=100,
        chunk_size=2,
        adapters={"a1": "m1", "b1": "m1", "a2": "m2"},
    )


def test_adapters_are_their_base_models_work() -> None:
    mixed = plan("a1", "m1", "b1", "a1")
    assert mixed.errors == [] and mixed.model == "m1"
    assert plan("a2").model == "m2"


def test_another_bases_adapter_or_an_unknown_one_is_a_line_error() -> None:
    wrong = plan("m1", "a1", "a2")
    assert [(e["code"], e["line"]) for e in wrong.errors] == [("mismatched_model", 3)]
    unknown = plan("a1", "nope")
    [error] = unknown.errors
    assert (error["code"], error["line"], error["param"]) == ("model_not_found", 2, "body.model")
    assert "'nope'" in error["message"] and "LoRA adapters: a1, b1, a2" in error["message"]


class EchoEngine:
    """Records which model each request named (pure-logic stand-in for the engine)."""

    model_name = "m"
    max_in_flight = 1

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> EngineResult:
        return EngineResult(status_code=200, body_json=json.dumps({"model": body["model"]}))


def test_offline_guard_serves_the_models_adapters() -> None:
    guard = ServedModelGuard(EchoEngine(), ["a"])

    def run(model: str) -> EngineResult:
        return asyncio.run(guard.run("/v1/chat/completions", {"model": model}, "r"))

    assert run("m").ok and run("a").ok
    missing = run("b")
    assert missing.status_code == 404
    assert missing.error_message is not None and "LoRA adapters: a" in missing.error_message


def test_cli_rejects_an_adapter_without_a_served_base(tmp_path: Path) -> None:
    args = ["run", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl")]
    result = CliRunner().invoke(app, [*args, "--model", "m=/w", "--lora", "a=/p@other"])
    assert result.exit_code == 2
    assert "base model 'other' is not served" in result.output
    result = CliRunner().invoke(
        app, ["worker", "--model", "m1=/w/1", "--model", "m2=/w/2", "--lora", "a=/p"]
    )
    assert result.exit_code == 2 and "several models are served" in result.output
