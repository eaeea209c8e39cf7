"""``vllm-batch run`` flag parsing: vLLM-style flags map onto ``RunOptions``/``Settings``."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from typer.testing import CliRunner

import vllm_batch.offline as offline
from vllm_batch.cli import app, commands, main
from vllm_batch.cli.commands import dashed
from vllm_batch.config import ModelSpec, Settings
from vllm_batch.engines import vllm_engine
from vllm_batch.engines.vllm_engine import CPU_PREFIX_BLOCK_SIZE, engine_argv
from vllm_batch.models.kinds import ModelKind
from vllm_batch.offline import RunFailed, RunOptions, RunSummary
from vllm_batch.offline.run_metrics import MetricsAddress

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


def test_enable_metrics_host_and_port(calls: list[RunOptions]) -> None:
    result = invoke("--model", "tiny=/m", "--enable-metrics", "--host", "0.0.0.0", "--port", "9109")
    assert result.exit_code == 0, result.output
    assert calls[0].metrics == MetricsAddress("0.0.0.0", 9109)
    assert calls[0].settings.metrics_enabled  # vLLM's scheduler stats feed the gauges


def test_metrics_are_off_unless_enabled(calls: list[RunOptions]) -> None:
    """As in vLLM, ``--port`` alone starts nothing; the engine keeps its stats to itself."""
    result = invoke("--model", "tiny=/m", "--port", "9109")
    assert result.exit_code == 0, result.output
    assert calls[0].metrics is None and not calls[0].settings.metrics_enabled


def test_deprecated_url_sets_the_metrics_host(calls: list[RunOptions]) -> None:
    result = invoke("--model", "tiny=/m", "--enable-metrics", "--url", "10.1.2.3")
    assert result.exit_code == 0, result.output
    assert calls[0].metrics == MetricsAddress("10.1.2.3", 8000)  # vLLM's default port
    assert "--url is deprecated (as in vLLM); use --host" in result.output


def test_lora_modules_and_always_on_flags(calls: list[RunOptions]) -> None:
    result = invoke(
        "--model", "tiny=/m", "--lora-modules", "sql=/a/sql", "--enable-prompt-tokens-details"
    )
    assert result.exit_code == 0, result.output
    assert calls[0].settings.loras == ["sql=/a/sql"]


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--response-role", "bot"], "--response-role (a `vllm run-batch` option): chat respon"),
        (["--enable-auto-tool-choice"], "tool-call parsers are not loaded"),
        (["--tool-call-parser=hermes"], "--tool-call-parser (a `vllm run-batch` option): tool-"),
        (["--no-enable-log-outputs"], "--enable-log-outputs (a `vllm run-batch` option): it co"),
        (["--reasoning-parser", "qwen3"], "reasoning parsers are not loaded"),
        (["--chat-template", "t.jinja"], "the model's own chat template is used"),
    ],
)
def test_run_batch_frontend_flags_are_refused_with_a_reason(
    calls: list[RunOptions], args: list[str], reason: str
) -> None:
    result = invoke("--model", "tiny=/m", *args)
    assert result.exit_code == 2 and calls == []
    assert f"unsupported option(s) for `vllm-batch run`: {' '.join(args)}" in result.output
    assert reason in result.output
    assert "supported vLLM flags: --model, --served-model-name" in result.output


@pytest.mark.parametrize(
    ("given", "seen"),
    [
        ("--max_num_seqs", "--max-num-seqs"),
        ("--max_num_seqs=4", "--max-num-seqs=4"),
        ("--served_model_name=my_model", "--served-model-name=my_model"),
        ("--model=/models/my_tiny", "--model=/models/my_tiny"),
        ("my_value", "my_value"),
        ("-i", "-i"),
    ],
)
def test_flags_take_underscores_as_vllm_does(given: str, seen: str) -> None:
    """``main`` rewrites only a long flag's name, never its value or a positional."""
    assert dashed(given) == seen


def test_underscored_flag_with_a_value_reaches_the_engine(
    calls: list[RunOptions], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["vllm-batch", "run", "-i", "in.jsonl", "-o", "out.jsonl", "--model=/models/tiny"]
    monkeypatch.setattr(sys, "argv", [*argv, "--max_num_seqs=4", "--max_model_len", "256"])
    monkeypatch.setattr(commands, "run_and_exit", lambda app: app())  # not os._exit
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 0
    assert calls[0].settings.max_num_seqs == 4 and calls[0].settings.max_model_len == 256
