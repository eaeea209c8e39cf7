"""Inference engines: vLLM in-process (the default) or on Ray actors (``executor="ray"``),
OpenAI-compatible upstreams (remote), and a benchmark-only instant engine."""

from __future__ import annotations

from collections.abc import Callable

from vllm_batch.config import ModelSpec, Settings
from vllm_batch.engines.engine import Engine


def make_engine(spec: ModelSpec, settings: Settings) -> Engine:
    """The engine ``settings.engine`` names, run as ``settings.executor`` says (in this
    process, or on Ray actors); vLLM and Ray are imported only when they are used."""
    if settings.executor == "ray":
        from vllm_batch.engines.ray_engine import RayEngine

        return RayEngine(spec, settings)
    if settings.engine == "instant-benchmark":
        from vllm_batch.engines.instant import InstantBenchmarkEngine

        return InstantBenchmarkEngine(spec.name)
    if settings.engine == "openai":
        from vllm_batch.engines.remote import RemoteEngine

        return RemoteEngine(spec, settings)
    from vllm_batch.engines.vllm_engine import VllmEngine

    return VllmEngine(spec, settings)


def engine_factory(settings: Settings) -> Callable[[ModelSpec], Engine]:
    """``make_engine`` with ``settings``: how every process's engine manager builds engines."""

    def factory(spec: ModelSpec) -> Engine:
        return make_engine(spec, settings)

    return factory
