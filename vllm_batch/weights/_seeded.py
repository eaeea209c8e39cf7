"""Seeded random weights that do not depend on how transformers initialises a model."""

from __future__ import annotations

from typing import Any


def seeded_model(model_class: Any, config: Any, seed: int, std: float) -> Any:
    """``model_class(config)`` with every parameter set, in name order, from one generator
    seeded with ``seed``: norm layers get weight 1 and bias 0, the rest draws from N(0, std²).

    The caller's torch RNG is left as it was. Returns the model in eval mode.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            owner, _, kind = name.rpartition(".")
            if owner.rsplit(".", 1)[-1].lower().endswith("norm"):  # LayerNorm, input_layernorm
                param.fill_(1.0 if kind == "weight" else 0.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    return model.eval()
