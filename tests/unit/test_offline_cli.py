"""``vllm-batch run`` flag parsing: vLLM-style flags map onto ``RunOptions``/``Settings``."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

import vllm_batch.offline as offline
from vllm_batch.cli import app
from vllm_batch.config import ModelSpec, Settings
from vllm_batch.engines import vllm_engine
from vllm_batch.engines.vllm_engine import CPU_PREFIX_BLOCK_SIZE, engine_argv
from vllm_batch.model_kinds import ModelKind
from vllm_batch.offline import RunFailed, RunOptions, RunSummary

runner = CliRunner()


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[RunOptions]:
    seen: list[RunOptions] = []

    def fake_run(options: RunOptions) -> RunSummary:
        seen.append(options)
        return RunSummary(total=2, resumed=0, finished=2, errors=1, output_tokens=9, seconds=1.0)

    monkeypatch.setattr(offline, "run_batch", fake_run)
    return seen


def invoke(*args: str) -> Any:
    return runner.invoke(app, ["run", "-i", "in.jsonl", "-o", "out.jsonl", *args])


def test_bare_model_path_is_served_under_the_path(calls: list[RunOptions]) -> None:
    result = invoke("--model", "/models/tiny")
    assert result.exit_code == 0, result.output
    assert calls[0].spec == ModelSpec("/models/tiny", "/models/tiny")
    assert calls[0].input == "in.jsonl" and calls[0].output == "out.jsonl"
    assert not calls[0].strict and not calls[0].resume


def test_served_model_name_and_engine_flags(calls: list[RunOptions]) -> None:
    result = invoke(
        "--model=/models/tiny",
        "--served-model-name",
        "tiny",
        "--max-num-seqs",
        "8",
        "--max-num-batched-tokens",
        "1024",
        "--block-size",
        "32",
        "--gpu-memory-utilization",
        "0.5",
        "-tp",
        "2",
        "--max-model-len",
        "512",
        "--dtype",
        "float32",
        "--enforce-eager",
        "--no-enable-prefix-caching",
        "--output-tmp-dir",
        "/spool",
        "--strict",
        "--resume",
    )
    assert result.exit_code == 0, result.output
    options = calls[0]
    assert options.spec == ModelSpec("tiny", "/models/tiny")
    assert options.output_tmp_dir == "/spool" and options.strict and options.resume
    s = options.settings
    assert (s.max_num_seqs, s.max_num_batched_tokens, s.max_model_len) == (8, 1024, 512)
    assert (s.gpu_memory_utilization, s.tensor_parallel_size, s.dtype) == (0.5, 2, "float32")
    assert s.enforce_eager is True and s.enable_prefix_caching is False
    assert s.block_size == 32
    argv = engine_argv(options.spec, s)
    assert argv[argv.index("--block-size") + 1] == "32"


def test_block_size_default_is_finer_on_cpu_only_where_prefixes_are_cached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def block(spec: ModelSpec, **values: Any) -> str | None:
        argv = engine_argv(spec, Settings(**values))
        return argv[argv.index("--block-size") + 1] if "--block-size" in argv else None

    chat = ModelSpec("m", "/models/m", kind=ModelKind.GENERATE)
    monkeypatch.setattr(vllm_engine, "has_cuda_gpu", lambda: False)
    assert block(chat) == str(CPU_PREFIX_BLOCK_SIZE)
    assert block(chat, block_size=128) == "128"  # a setting always wins
    assert block(chat, enable_prefix_caching=False) is None  # vLLM's default
    assert block(ModelSpec("e", "/models/e", kind=ModelKind.EMBED)) is None
    monkeypatch.setattr(vllm_engine, "has_cuda_gpu", lambda: True)
    assert block(chat) is None  # vLLM's GPU default (16) is fine-grained already


def test_unknown_vllm_flags_are_rejected(calls: list[RunOptions]) -> None:
    result = invoke("--model", "tiny=/m", "--swap-space", "4")
    assert result.exit_code == 2 and calls == []
    assert "unsupported option(s) for `vllm-batch run`: --swap-space 4" in result.output


def test_run_failures_set_the_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(options: RunOptions) -> RunSummary:
        raise RunFailed("in.jsonl: 1 invalid line(s):\n  line 3: not valid JSON", 2)

    monkeypatch.setattr(offline, "run_batch", failing)
    result = invoke("--model", "tiny=/m")
    assert result.exit_code == 2 and "line 3: not valid JSON" in result.output
