"""Settings from the flags: the environment first, then the flags given, checked together."""

from __future__ import annotations

import os
from typing import Any

import typer

from vllm_batch.cli.options import Executor, Given
from vllm_batch.config import ModelSpec, Settings
from vllm_batch.observability.logs import add_secrets, configure_logging


def build_settings(**overrides: Any) -> Settings:
    """Environment first, then explicit CLI flags (those not left at None).

    A bad combination (``--engine openai`` without ``--engine-url``, ...) is a usage error.
    """
    from pydantic import ValidationError

    values = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**values)
    except ValidationError as exc:
        messages = "; ".join(
            str(error["msg"]).removeprefix("Value error, ") for error in exc.errors()
        )
        raise typer.BadParameter(messages) from None


def settings_from(given: Given, *, exclude: tuple[str, ...] = (), **extra: Any) -> Settings:
    """``build_settings`` from the given flags (``--ray-*`` checked against the executor)."""
    values = given.settings_values(exclude=exclude)
    check_ray(values)
    return build_settings(**values, **extra)


def check_ray(values: dict[str, Any]) -> None:
    """``--ray-*`` without ``--executor ray`` (flag or environment) is a usage error."""
    chosen = values.get("executor", os.environ.get("VLLM_BATCH_EXECUTOR"))
    given = [f"--{k.replace('_', '-')}" for k in ("ray_address", "ray_replicas") if values.get(k)]
    if given and chosen != Executor.ray:
        raise typer.BadParameter(f"{' and '.join(given)} need --executor ray")


def with_upstream_models(settings: Settings) -> Settings:
    """With ``--engine openai`` and no ``--model``: serve every model the upstreams list."""
    if settings.engine != "openai" or settings.models:
        return settings
    from vllm_batch.engines.upstreams import UpstreamsUnreachable, discover_models

    try:
        names = discover_models(settings.engine_urls, settings.engine_api_key)
    except UpstreamsUnreachable as exc:
        raise typer.BadParameter(
            f"no upstream answered /models ({exc}); name the models with --model NAME "
            "(or NAME=UPSTREAM_MODEL) to start before the upstreams do",
            param_hint="--engine-url",
        ) from None
    if not names:
        raise typer.BadParameter("the upstreams serve no model", param_hint="--engine-url")
    return settings.model_copy(update={"models": names})


def with_served_model_name(settings: Settings, name: str | None) -> Settings:
    """``--served-model-name``: the name of the only model (as ``run``'s)."""
    if not name:
        return settings
    if len(settings.models) != 1:
        raise typer.BadParameter(
            f"needs exactly one model, not {len(settings.models)}", param_hint="--served-model-name"
        )
    spec = ModelSpec.parse(settings.models[0])
    renamed = f"{name}={spec.path}" + (f":{spec.kind.value}" if spec.kind else "")
    return settings.model_copy(update={"models": [renamed]})


def engine_settings(given: Given, **extra: Any) -> Settings:
    """``serve``'s and ``worker``'s settings: the flags, the upstreams' models (with
    ``--engine openai`` and no ``--model``), the served name, the adapters checked."""
    settings = settings_from(given, **extra)
    settings = with_upstream_models(settings)
    try:
        settings = with_served_model_name(settings, given["served_model_name"])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--model") from None
    check_adapters(settings)
    return settings


def check_adapters(settings: Settings, models: list[str] | None = None) -> None:
    """Exit with a usage error unless every LoRA adapter has one served base model."""
    from vllm_batch.models.adapters import AdapterConfigError, resolve_adapters

    try:
        resolve_adapters(settings.loras, settings.served_model_names if models is None else models)
    except AdapterConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--lora") from None


def setup_logging(settings: Settings, secrets: list[str] | None = None) -> str:
    """JSON or console logs at ``settings.log_level``; secrets registered for redaction."""
    add_secrets(
        [
            settings.api_key,
            settings.webhook_secret,
            settings.label_studio_api_key,
            settings.postgres_password,
            settings.engine_api_key,
            *(secrets or []),
        ]
    )
    return configure_logging(settings.log_level, settings.log_format)
