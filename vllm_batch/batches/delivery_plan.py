"""Which deliveries a finished batch gets: the selected handlers and the webhook URLs.

Handlers are found by ``handlers.discovery``. ``VLLM_BATCH_HANDLERS`` picks which run
("webhook" is the webhook delivery); by default every handler runs whose
``enabled(metadata)`` is true for the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vllm_batch.batches.states import BatchStatus, DeliveryKind, DeliveryStatus
from vllm_batch.batches.store.outbox import receiver_of
from vllm_batch.batches.store.rows import DeliveryRow
from vllm_batch.config import Settings
from vllm_batch.handlers.base import ResultHandler, call_enabled
from vllm_batch.handlers.discovery import HandlerConfigError, discover
from vllm_batch.protocol.ids import new_id
from vllm_batch.protocol.webhook_event import EVENT_TYPES, check_secret

log = logging.getLogger(__name__)
WEBHOOK = "webhook"
# Statuses whose batches have result files for handlers (a failed batch never ran a line).
HANDLED_STATUSES = frozenset({BatchStatus.COMPLETED, BatchStatus.CANCELLED, BatchStatus.EXPIRED})


@dataclass
class DeliveryPlan:
    """The webhook URLs and handlers this process plans for every finished batch."""

    webhook_urls: tuple[str, ...] = ()
    webhooks: bool = True
    handlers: dict[str, ResultHandler] = field(default_factory=dict)
    retry_horizon: float = 72 * 3600

    @classmethod
    def load(cls, settings: Settings) -> DeliveryPlan:
        if settings.webhook_secret:
            try:
                check_secret(settings.webhook_secret)
            except ValueError as exc:
                raise HandlerConfigError(str(exc)) from None
        available = discover(settings)
        chosen: Sequence[str] = (
            settings.handlers if settings.handlers is not None else [WEBHOOK, *available]
        )
        unknown = [name for name in chosen if name != WEBHOOK and name not in available]
        if unknown:
            raise HandlerConfigError(
                f"VLLM_BATCH_HANDLERS names unknown handler(s) {', '.join(unknown)}; "
                f"available: {', '.join([WEBHOOK, *available])}"
            )
        return cls(
            webhook_urls=tuple(dict.fromkeys(settings.webhook_urls)),
            webhooks=WEBHOOK in chosen,
            handlers={name: available[name] for name in chosen if name != WEBHOOK},
            retry_horizon=settings.delivery_retry_horizon,
        )

    def webhook_targets(self, metadata: dict[str, Any] | None) -> list[str]:
        if not self.webhooks:
            return []
        own = (metadata or {}).get("webhook_url")
        return list(dict.fromkeys([*([own] if own else []), *self.webhook_urls]))

    def handler_names(self, metadata: dict[str, Any] | None) -> list[str]:
        names = []
        for name, handler in self.handlers.items():
            try:
                if call_enabled(handler, dict(metadata or {})):
                    names.append(name)
            except Exception:
                log.exception("result handler %s: enabled() raised; not planned", name)
        return names

    def rows(
        self,
        batch_id: str,
        metadata: dict[str, Any] | None,
        status: BatchStatus,
        now: float,
    ) -> list[DeliveryRow]:
        """The outbox rows for ``batch_id`` reaching ``status`` (one event id for all)."""
        event_id = new_id("evt_")
        targets = [(DeliveryKind.WEBHOOK, url) for url in self.webhook_targets(metadata)]
        if status in HANDLED_STATUSES:
            targets += [(DeliveryKind.HANDLER, name) for name in self.handler_names(metadata)]
        return [
            DeliveryRow(
                id=new_id("dlv_"),
                batch_id=batch_id,
                event_id=event_id,
                event_type=EVENT_TYPES[status],
                kind=kind,
                target=target,
                receiver=receiver_of(kind, target),
                status=DeliveryStatus.PENDING,
                attempts=0,
                created_at=now,
                next_attempt_at=now,
                give_up_at=now + self.retry_horizon,
            )
            for kind, target in targets
        ]
