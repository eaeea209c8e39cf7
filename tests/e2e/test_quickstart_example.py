"""The quick start's promise (README.md): `make serve`, then examples/quickstart.py gets
"Paris" from SmolLM2."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import ServerProcess, served
from vllm_batch.config import DEFAULT_MODEL_NAME, default_model_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smollm2_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    from vllm_batch.weights.smollm2 import prepare_smollm2

    model_dir = prepare_smollm2(ROOT / default_model_dir())  # no-op once prepared
    args = ["--model", f"{DEFAULT_MODEL_NAME}={model_dir}", "--max-model-len", "2048"]
    env = {"VLLM_BATCH_KV_CACHE_GIB": "0.5"}  # SmolLM2: 46 KB per token
    yield from served(args, tmp_path_factory.mktemp("smollm2"), env=env)


@pytest.mark.slow
def test_quickstart_answers_paris(smollm2_server: ServerProcess) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        env={"VLLM_BATCH_URL": smollm2_server.base_url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "completed" in result.stdout
    answers = dict(line.split(" ", 1) for line in result.stdout.splitlines()[1:])
    assert "Paris" in answers["q0"], result.stdout
    assert set(answers) == {"q0", "q1", "q2"}
