"""The Ray executor's settings: replica sizing, where Ray runs, and the CLI flags."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from vllm_batch.cli import app
from vllm_batch.config import ModelSpec, Settings
from vllm_batch.engines import make_engine
from vllm_batch.engines.ray_cluster import LOCAL_ENV, init_options
from vllm_batch.engines.ray_engine import RayEngine, ReplicaPlan, plan_replicas

runner = CliRunner()


@pytest.mark.parametrize(
    ("overrides", "cluster", "plan"),
    [
        ({}, {"CPU": 2.0}, ReplicaPlan(1, 1.0, 0.0)),  # no GPUs: one CPU replica
        ({}, {"CPU": 64.0, "GPU": 8.0}, ReplicaPlan(8, 1.0, 1.0)),  # one per GPU
        ({"tensor_parallel_size": 2}, {"GPU": 8.0}, ReplicaPlan(4, 1.0, 2.0)),
        ({"tensor_parallel_size": 4}, {"GPU": 2.0}, ReplicaPlan(1, 1.0, 4.0)),  # Ray waits
        ({"ray_replicas": 3, "ray_cpus_per_replica": 4}, {"GPU": 8.0}, ReplicaPlan(3, 4.0, 1.0)),
        ({"ray_gpus_per_replica": 0.5}, {"GPU": 2.0}, ReplicaPlan(4, 1.0, 0.5)),
        ({"ray_replicas": 2, "ray_gpus_per_replica": 0}, {"GPU": 2.0}, ReplicaPlan(2, 1.0, 0.0)),
    ],
)
def test_plan_replicas(
    overrides: dict[str, object], cluster: dict[str, float], plan: ReplicaPlan
) -> None:
    assert plan_replicas(Settings(**overrides), cluster) == plan


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_BATCH_EXECUTOR", "ray")
    monkeypatch.setenv("VLLM_BATCH_RAY_ADDRESS", "head.internal:6379")
    monkeypatch.setenv("VLLM_BATCH_RAY_REPLICAS", "12")
    settings = Settings()
    assert (settings.executor, settings.ray_address, settings.ray_replicas) == (
        "ray",
        "head.internal:6379",
        12,
    )
    engine = make_engine(ModelSpec("m", "/models/m"), settings)
    assert isinstance(engine, RayEngine) and engine.model_name == "m"


def test_where_ray_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    options, env = init_options(None)  # a private instance, on loopback
    assert options["address"] == "local" and env.items() >= LOCAL_ENV.items()
    assert options["include_dashboard"] is False and env["RAY_USAGE_STATS_ENABLED"] == "0"
    options, env = init_options("auto")
    assert options["address"] == "auto" and not env.keys() & LOCAL_ENV.keys()
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    assert init_options(None)[0]["address"] == "10.1.2.3:6379"
    assert init_options("head:6379")[0]["address"] == "head:6379"


@pytest.mark.parametrize("command", ["run", "worker", "serve"])
def test_ray_flags_need_the_ray_executor(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VLLM_BATCH_EXECUTOR", raising=False)
    args = [command, "--ray-address", "head:6379", "--ray-replicas", "2"]
    if command == "run":
        args += ["-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out"), "--model", "m"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "--ray-address and --ray-replicas need --executor ray" in result.output


def test_unknown_executor_is_refused() -> None:
    result = runner.invoke(app, ["worker", "--executor", "slurm"])
    assert result.exit_code == 2
    assert "Invalid value for '--executor'" in result.output and "'slurm'" in result.output


def test_ray_executor_and_remote_engine_exclude_each_other() -> None:
    with pytest.raises(ValidationError, match="use one of them"):
        Settings(executor="ray", engine="openai", engine_urls=["http://127.0.0.1:8000/v1"])
    args = ["worker", "--executor", "ray", "--engine", "openai"]
    result = runner.invoke(app, [*args, "--engine-url", "http://127.0.0.1:8000/v1"])
    assert result.exit_code == 2 and "use one of them" in result.output
