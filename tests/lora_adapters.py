"""Tiny LoRA adapters for the tiny test model, made with ``peft`` (a test dependency).

``lora_B`` starts at zero in ``peft`` (the adapter would change nothing), so every LoRA
matrix is filled from a seeded generator: the adapter changes the model's output, and
the same ``seed`` always gives the same adapter.
"""

from __future__ import annotations

from pathlib import Path

LORA_RANK = 8
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_test_lora(base_model: Path, out_dir: Path, seed: int) -> Path:
    """Write a rank-8 adapter of ``base_model`` with random non-zero weights to ``out_dir``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (out_dir / "adapter_config.json").is_file():
        return out_dir
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    config = LoraConfig(
        r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=TARGET_MODULES, lora_dropout=0.0
    )
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
