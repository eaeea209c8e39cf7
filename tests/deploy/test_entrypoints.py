"""Every ``vllm-batch`` command line in the Dockerfiles, compose file and Kubernetes manifests
is a real CLI command: it parses with the CLI's own parser, and its ``--help`` runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import typer

from tests.deploy.deployfiles import (
    DOCKERFILES,
    REPO,
    command_path,
    compose_config,
    dockerfile_instruction,
    dockerfile_run_cli_calls,
    k8s_resources,
    parse_cli,
    pod_spec,
)

IMAGE = "vllm-batch"  # the image name compose and the Kubernetes manifests use


def command_lines() -> list[tuple[str, list[str]]]:
    """(where, argv) for each place a container runs our CLI."""
    lines: list[tuple[str, list[str]]] = []
    for path in DOCKERFILES:
        entry = dockerfile_instruction(path, "ENTRYPOINT")
        lines.append((f"{path.name}:ENTRYPOINT+CMD", entry + dockerfile_instruction(path, "CMD")))
        lines += [(f"{path.name}:RUN", argv) for argv in dockerfile_run_cli_calls(path)]
    entry = dockerfile_instruction(DOCKERFILES[0], "ENTRYPOINT")
    default_cmd = dockerfile_instruction(DOCKERFILES[0], "CMD")
    services = compose_config(("monitoring", "curation"))["services"]
    for name, service in services.items():
        if "build" in service:  # built from our Dockerfile
            argv = (service.get("entrypoint") or entry) + (service.get("command") or default_cmd)
            lines.append((f"compose:{name}", argv))
    for path, resource in k8s_resources():
        spec = pod_spec(resource)
        for container in spec["containers"] if spec else []:
            if container["image"].split(":")[0] == IMAGE:
                argv = (container.get("command") or entry) + (container.get("args") or default_cmd)
                lines.append((f"{path.name}:{container['name']}", argv))
    return lines


LINES = command_lines()


def test_images_enter_through_the_cli() -> None:
    for path in DOCKERFILES:
        assert dockerfile_instruction(path, "ENTRYPOINT") == ["vllm-batch"], path.name
        assert dockerfile_instruction(path, "CMD")[:1] == ["serve"], path.name
    where = {w.split(":")[0] for w, _ in LINES}
    assert {"Dockerfile", "Dockerfile.cpu", "compose", "server.yaml", "worker.yaml"} <= where


@pytest.mark.parametrize(("where", "argv"), LINES, ids=[w for w, _ in LINES])
def test_command_line_parses_with_the_cli(where: str, argv: list[str]) -> None:
    ctx = parse_cli(argv)  # unknown command or flag, or a bad value: raises
    if "--port" in argv:
        assert ctx.params["port"] == int(argv[argv.index("--port") + 1])


def test_roles_are_the_api_server_and_the_worker() -> None:
    roles = {where: command_path(argv) for where, argv in LINES}
    for where in ("compose:server", "server.yaml:server"):
        assert roles[where] == ["serve"]
        argv = dict(LINES)[where]
        assert parse_cli(argv).params["worker"] is False  # the API only; workers scale apart
    for where in ("compose:worker", "worker.yaml:worker"):
        assert roles[where] == ["worker"]


def test_parser_rejects_what_the_cli_rejects() -> None:
    with pytest.raises(typer.exceptions.TyperException):  # type: ignore[attr-defined]
        parse_cli(["vllm-batch", "serve", "--no-such-flag"])
    with pytest.raises(typer.exceptions.TyperException):  # type: ignore[attr-defined]
        parse_cli(["vllm-batch", "serve", "--port", "http"])
    with pytest.raises(AssertionError):
        parse_cli(["vllm-batch", "serv"])


def test_help_runs_for_every_command_used_and_lists_its_flags() -> None:
    flags: dict[tuple[str, ...], set[str]] = {}
    for _, argv in LINES:
        used = {a.split("=")[0] for a in argv if a.startswith("--")}
        flags.setdefault(tuple(command_path(argv)), set()).update(used)
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", "NO_COLOR": "1"}
    for path, used in flags.items():
        result = subprocess.run(
            [sys.executable, "-m", "vllm_batch.cli", *path, "--help"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        for flag in used:
            assert flag in result.stdout, f"`vllm-batch {' '.join(path)} --help` lacks {flag}"
