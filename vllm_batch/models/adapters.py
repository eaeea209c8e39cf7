"""LoRA adapters: ``--lora NAME=PATH[@MODEL]`` specs, each served on one base model.

A request whose ``body.model`` names an adapter runs on the adapter's base model with the
adapter applied (vLLM's ``LoRARequest``, chosen by vLLM's serving layer from the name).
For batching, an adapter's lines are its base model's work: one batch may mix the base
model and any of its adapters.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ``max_lora_rank`` values vLLM accepts (``vllm.config.lora.MaxLoRARanks``)."""
DEFAULT_LORA_RANK = 16


class AdapterConfigError(ValueError):
    """A LoRA spec is malformed, names an unknown base model, or clashes with a name."""


@dataclass(frozen=True)
class LoraSpec:
    """A served adapter: the name requests use, its weights, and its base model's name."""

    name: str
    path: str
    base: str | None = None
    """The served model it applies to; None: the only served model."""

    @classmethod
    def parse(cls, spec: str) -> LoraSpec:
        """Parse ``NAME=PATH`` or ``NAME=PATH@MODEL`` (MODEL: a served model's name)."""
        name, sep, rest = spec.strip().partition("=")
        path, at, base = rest.rpartition("@")
        if not at:
            path, base = rest, ""
        if not sep or not name or not path or (at and not base):
            raise AdapterConfigError(
                f"invalid LoRA spec {spec!r}: expected NAME=PATH or NAME=PATH@MODEL"
            )
        return cls(name=name.strip(), path=path.strip(), base=base.strip() or None)


def resolve_adapters(specs: Sequence[str], models: Sequence[str]) -> list[LoraSpec]:
    """Parse ``specs`` and give each its base model from ``models`` (the served names).

    Raises ``AdapterConfigError`` for a bad spec, an unknown or ambiguous base model, or a
    name used twice (by two adapters, or by an adapter and a model).
    """
    resolved: list[LoraSpec] = []
    taken = set(models)
    for text in specs:
        spec = LoraSpec.parse(text)
        base = spec.base
        if base is None:
            if len(models) != 1:
                raise AdapterConfigError(
                    f"LoRA adapter {spec.name!r}: several models are served "
                    f"({', '.join(models)}); name its base model as NAME=PATH@MODEL"
                )
            base = models[0]
        elif base not in models:
            raise AdapterConfigError(
                f"LoRA adapter {spec.name!r}: base model {base!r} is not served "
                f"(served: {', '.join(models) or 'none'})"
            )
        if spec.name in taken:
            raise AdapterConfigError(
                f"LoRA adapter name {spec.name!r} is already used by a model or adapter"
            )
        taken.add(spec.name)
        resolved.append(LoraSpec(spec.name, spec.path, base))
    return resolved


def adapter_bases(adapters: Sequence[LoraSpec]) -> dict[str, str]:
    """``{adapter name: base model name}`` for resolved adapters."""
    return {a.name: a.base for a in adapters if a.base is not None}


def base_model(model: str, bases: Mapping[str, str]) -> str:
    """The model whose engine serves ``model`` (itself unless it is an adapter)."""
    return bases.get(model, model)


def adapter_rank(path: str) -> int | None:
    """The rank ``r`` in a local adapter's ``adapter_config.json`` (None if unreadable)."""
    try:
        config = json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    rank = config.get("r") if isinstance(config, dict) else None
    return rank if isinstance(rank, int) and rank > 0 else None


def max_lora_rank(adapters: Sequence[LoraSpec]) -> int:
    """The smallest rank vLLM accepts that fits every adapter (16 when none can be read)."""
    ranks = [r for r in (adapter_rank(a.path) for a in adapters) if r is not None]
    needed = max(ranks, default=DEFAULT_LORA_RANK)
    return next((r for r in VLLM_LORA_RANKS if r >= needed), VLLM_LORA_RANKS[-1])
