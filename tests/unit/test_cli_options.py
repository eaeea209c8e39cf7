"""The one options model: each flag declared once; serve and worker take run's engine flags;
``--version``; shell completion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer.core
import typer.main
from typer.testing import CliRunner

import vllm_batch.cli.serve as serve_module
import vllm_batch.cli.worker as worker_module
from vllm_batch.cli import app
from vllm_batch.cli import options as o
from vllm_batch.cli.commands import package_version
from vllm_batch.config import Settings

runner = CliRunner()

RUN_ONLY = {
    # `vllm run-batch`'s own flags: a file in, a file out, how to run through it.
    "-i", "--input-file", "-o", "--output-file", "--output-tmp-dir", "--strict", "--resume",
    "--progress-interval", "--max-buffered-results", "--runner", "--enable-metrics",
    "--url", "--enable-prompt-tokens-details",
    # Where --enable-metrics listens (serve: where the API listens).
    "--host", "--port",
}  # fmt: skip


def command(name: str) -> Any:
    """``vllm-batch NAME`` as typer's click-compatible command object."""
    group: Any = typer.main.get_command(app)
    return group.commands[name]


def option_names(name: str) -> list[str]:
    """Every option name and alias of ``vllm-batch NAME``, as many times as declared."""
    return [
        opt
        for param in command(name).params
        if isinstance(param, typer.core.TyperOption)
        for opt in (*param.opts, *param.secondary_opts)
    ]


@pytest.mark.parametrize("name", ["serve", "worker", "run"])
def test_no_command_declares_a_flag_twice(name: str) -> None:
    names = option_names(name)
    assert len(names) > 10
    assert sorted({n for n in names if names.count(n) > 1}) == []


def test_every_flag_is_declared_once_in_the_options_model() -> None:
    flags = [value for value in vars(o).values() if isinstance(value, o.Flag)]
    params = [f.param for f in flags]
    decls = [d for f in flags for d in f.option.param_decls]
    assert sorted({p for p in params if params.count(p) > 1}) == []
    assert sorted({d for d in decls if decls.count(d) > 1}) == []
    settings = [f.setting for f in flags if f.setting is not None]
    assert sorted({s for s in settings if settings.count(s) > 1}) == []
    assert set(settings) <= set(Settings.model_fields)


def test_serve_and_worker_take_every_engine_flag_of_run() -> None:
    engine = set(option_names("run")) - RUN_ONLY - {"--help"}
    assert {"-tp", "--tensor-parallel-size", "--served-model-name", "--lora-modules"} <= engine
    for name in ("serve", "worker"):
        assert engine - set(option_names(name)) == set(), name


def test_a_flag_listed_twice_in_a_command_is_refused() -> None:
    with pytest.raises(ValueError, match="flags listed twice: dtype"):
        o.command(o.DTYPE, o.MAX_NUM_SEQS, o.DTYPE)


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """The settings serve and worker would start with (nothing started)."""
    seen: list[Settings] = []

    def fake_server(settings: Settings, key_required: bool, fmt: str) -> None:
        seen.append(settings)

    async def fake_worker(settings: Settings) -> None:
        seen.append(settings)

    monkeypatch.setattr(serve_module, "run_server", fake_server)
    monkeypatch.setattr(worker_module, "run_worker", fake_worker)
    monkeypatch.delenv("VLLM_BATCH_MODELS", raising=False)
    return seen


@pytest.mark.parametrize("name", ["serve", "worker"])
def test_serve_and_worker_take_tp_and_served_model_name(name: str, started: list[Any]) -> None:
    result = runner.invoke(
        app,
        [name, "--model", "/models/tiny:generate", "--served-model-name", "tiny", "-tp", "2",
         "--lora-modules", "sql=/a/sql", "--max-num-seqs", "8", "--log-level", "warning"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    [settings] = started
    assert settings.models == ["tiny=/models/tiny:generate"]
    assert settings.served_model_names == ["tiny"]
    assert settings.tensor_parallel_size == 2 and settings.max_num_seqs == 8
    assert settings.loras == ["sql=/a/sql"] and settings.log_level == "warning"


def test_served_model_name_needs_exactly_one_model(started: list[Any]) -> None:
    result = runner.invoke(
        app, ["serve", "--model", "a=/m/a", "--model", "b=/m/b", "--served-model-name", "x"]
    )
    assert result.exit_code == 2 and started == []
    assert "--served-model-name" in result.output and "exactly one model" in result.output


def test_unset_flags_leave_the_environment(
    started: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_BATCH_TENSOR_PARALLEL_SIZE", "4")
    monkeypatch.setenv("VLLM_BATCH_MAX_NUM_SEQS", "16")
    result = runner.invoke(app, ["worker", "--model", "/m", "--max-num-seqs", "3"])
    assert result.exit_code == 0, result.output
    assert (started[0].tensor_parallel_size, started[0].max_num_seqs) == (4, 3)


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"vllm-batch {package_version()}\n"
    assert package_version() == "0.1.0"  # pyproject.toml's


def test_shell_completion_is_on() -> None:
    script = runner.invoke(app, ["--show-completion", "bash"], prog_name="vllm-batch")
    assert script.exit_code == 0
    assert "complete -o default -F _vllm_batch_completion vllm-batch" in script.output
    env = {
        "_VLLM_BATCH_COMPLETE": "complete_bash",
        "COMP_WORDS": "vllm-batch ser",
        "COMP_CWORD": "1",
    }
    words = runner.invoke(app, [], prog_name="vllm-batch", env=env)
    assert words.output.split() == ["serve"]
    env = {**env, "COMP_WORDS": "vllm-batch serve --served", "COMP_CWORD": "2"}
    words = runner.invoke(app, [], prog_name="vllm-batch", env=env)
    assert words.output.split() == ["--served-model-name"]


def test_api_key_file_sets_the_api_key(started: list[Any], tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("  sk-from-file\n")
    result = runner.invoke(app, ["serve", "--model", "/m", "--api-key-file", str(path)])
    assert result.exit_code == 0, result.output
    assert started[0].api_key == "sk-from-file"


def test_run_needs_its_model() -> None:
    result = runner.invoke(app, ["run", "-i", "in.jsonl", "-o", "out.jsonl"])
    assert result.exit_code == 2 and "Missing option '--model'" in result.output
