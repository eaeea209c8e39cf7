"""Which deliveries a finished batch gets, and how retries are spaced."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from vllm_batch.batches.delivery_plan import DeliveryPlan
from vllm_batch.batches.states import BatchStatus
from vllm_batch.config import Settings
from vllm_batch.deliveries.dispatcher import backoff_delay
from vllm_batch.handlers import ResultHandler, get_registry, register_handler
from vllm_batch.handlers.base import call_enabled
from vllm_batch.handlers.discovery import HandlerConfigError


class Named(ResultHandler):
    def __init__(self, name: str, on: bool = True) -> None:
        super().__init__()
        self._name, self.on = name, on

    def name(self) -> str:
        return self._name

    def enabled(self, metadata: dict[str, Any] | None = None) -> bool:
        return self.on and (metadata or {}).get("off") != self._name

    def handle(self, batch_id: str, results: Any, metadata: dict[str, Any]) -> bool:
        return True


class Legacy(Named):
    def enabled(self) -> bool:  # type: ignore[override]
        return True


@pytest.fixture
def registered() -> Iterator[None]:
    for handler in (Named("alpha"), Named("beta", on=False), Legacy("legacy")):
        register_handler(handler)
    yield
    for name in ("alpha", "beta", "legacy"):
        get_registry().unregister(name)


def test_default_plan_runs_every_enabled_handler_and_every_webhook(registered: None) -> None:
    plan = DeliveryPlan.load(Settings(webhook_urls=["https://a.example/h", "https://a.example/h"]))
    rows = plan.rows("batch_1", {"webhook_url": "https://own.example/x"}, BatchStatus.COMPLETED, 10)
    assert [(r.kind, r.target) for r in rows] == [
        ("webhook", "https://own.example/x"),
        ("webhook", "https://a.example/h"),
        ("handler", "alpha"),
        ("handler", "legacy"),
    ]
    assert len({r.event_id for r in rows}) == 1 and rows[0].event_id.startswith("evt_")
    assert {r.event_type for r in rows} == {"batch.completed"}
    assert all(r.next_attempt_at == 10 and r.give_up_at == 10 + 72 * 3600 for r in rows)
    assert [r.target for r in plan.rows("b", {"off": "alpha"}, BatchStatus.CANCELLED, 0)] == [
        "https://a.example/h",
        "legacy",
    ]
    failed = plan.rows("b", None, BatchStatus.FAILED, 0)  # no results: webhooks only
    assert [(r.kind, r.event_type) for r in failed] == [("webhook", "batch.failed")]


def test_handlers_setting_selects_and_rejects_unknown_names(registered: None) -> None:
    plan = DeliveryPlan.load(
        Settings(handlers=["beta"], webhook_urls=["https://a.example/h"])  # no "webhook"
    )
    assert plan.webhooks is False and list(plan.handlers) == ["beta"]
    assert plan.rows("b", {"webhook_url": "https://x.example"}, BatchStatus.COMPLETED, 0) == []
    with pytest.raises(HandlerConfigError, match=r"unknown handler.*nope.*available: webhook"):
        DeliveryPlan.load(Settings(handlers=["webhook", "nope"]))
    with pytest.raises(HandlerConfigError, match="cannot import 'no_such_module_x'"):
        DeliveryPlan.load(Settings(handler_modules=["no_such_module_x"]))


def test_builtins_are_listed_and_disabled_without_settings() -> None:
    plan = DeliveryPlan.load(Settings())
    assert {"label_studio", "s3", "postgres", "template"} <= set(plan.handlers)
    assert plan.handler_names({}) == []
    configured = DeliveryPlan.load(Settings(s3_handler_target="s3://bucket/prefix"))
    assert configured.handler_names({}) == ["s3"]


def test_legacy_enabled_without_metadata() -> None:
    assert call_enabled(Legacy("x"), {"a": 1}) is True
    assert call_enabled(Named("y"), {"off": "y"}) is False


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    delays = [backoff_delay(n, 5, 3600) for n in range(1, 12)]
    for n, delay in enumerate(delays, start=1):
        assert 0.5 * min(3600, 5 * 2 ** (n - 1)) <= delay <= min(3600, 5 * 2 ** (n - 1))
    assert len({backoff_delay(3, 5, 3600) for _ in range(20)}) > 1
    assert backoff_delay(40, 5, 3600) <= 3600


def test_bad_handler_settings_stop_the_start() -> None:
    with pytest.raises(HandlerConfigError, match="whsec_"):
        DeliveryPlan.load(Settings(webhook_secret="not-a-secret!"))
    with pytest.raises(HandlerConfigError, match=r"built-in result handler settings: .*s3://"):
        DeliveryPlan.load(Settings(s3_handler_target="https://bucket/prefix"))
