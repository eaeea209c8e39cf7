"""The delivery dispatcher: leases due outbox rows, runs them, records every attempt.

One runs in every server and worker process (unless ``deliveries`` is off). It never
touches batch processing: webhooks are async HTTP calls, and handlers run in a thread pool
of their own (an async handler in its own event loop there). A failed attempt is retried
with exponential backoff and jitter until the delivery's ``give_up_at``; a refused URL
fails at once. Leases are renewed while an attempt runs, so a slow handler is never run
twice at once; a killed process's leases expire and another process (or its restart)
takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from vllm_batch.batches import lifecycle
from vllm_batch.batches.states import DeliveryStatus, IllegalTransition
from vllm_batch.batches.store import outbox, queries
from vllm_batch.batches.store.db import is_transient
from vllm_batch.batches.store.db_retry import retry_db
from vllm_batch.batches.store.rows import DeliveryRow
from vllm_batch.batches.store_context import StoreContext
from vllm_batch.deliveries.receivers import ReceiverGate
from vllm_batch.deliveries.webhook import Outcome, deliver
from vllm_batch.handlers.base import ResultHandler
from vllm_batch.handlers.results import BatchInfo, ResultStream
from vllm_batch.net.guard import AllowList
from vllm_batch.observability import metrics
from vllm_batch.observability.logs import bound
from vllm_batch.protocol.webhook_event import event_body
from vllm_batch.retry import describe

log = logging.getLogger(__name__)
WEBHOOK_SECRET_NAME = "webhook"
MIN_LEASE_SECONDS = 60.0
# The delivery's status after an attempt → the ``delivery_attempts`` outcome label.
ATTEMPT_OUTCOMES: dict[DeliveryStatus, str] = {
    DeliveryStatus.SUCCEEDED: "succeeded",
    DeliveryStatus.PENDING: "retrying",
    DeliveryStatus.FAILED: "failed",
}


async def webhook_secret(ctx: StoreContext) -> str:
    """``VLLM_BATCH_WEBHOOK_SECRET``, else the one stored in the database (made on first use)."""
    from vllm_batch.protocol.ids import now
    from vllm_batch.protocol.webhook_event import check_secret, new_secret

    if ctx.settings.webhook_secret:
        return check_secret(ctx.settings.webhook_secret)
    async with ctx.sessions() as session, session.begin():
        return await outbox.get_or_create_secret(session, WEBHOOK_SECRET_NAME, new_secret(), now())


def backoff_delay(attempts: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter: ``base * 2**(attempts-1)``, capped, times [0.5, 1]."""
    return min(cap, base * 2 ** max(0, attempts - 1)) * random.uniform(0.5, 1.0)


def _run_handler(
    handler: ResultHandler, batch_id: str, results: ResultStream, metadata: dict[str, Any]
) -> Outcome:
    """Call ``handler.handle`` (in a worker thread); any error becomes a failed outcome."""
    try:
        returned = handler.handle(batch_id, results, metadata)
        if inspect.isawaitable(returned):
            returned = asyncio.run(_awaited(returned))
    except Exception as exc:
        with contextlib.suppress(Exception):
            handler.on_error(exc)
        return Outcome(False, error=f"{type(exc).__name__}: {exc}"[:1000])
    if returned is False:
        return Outcome(False, error="handler returned False")
    return Outcome(True)


async def _awaited(value: Awaitable[Any]) -> Any:
    return await value


class DeliveryDispatcher:
    """Runs due deliveries with at most ``delivery_concurrency`` in flight, and at most
    ``delivery_host_concurrency`` per receiver behind its circuit breaker (``receivers``)."""

    def __init__(self, ctx: StoreContext) -> None:
        self.ctx = ctx
        settings = ctx.settings
        self.allow = AllowList(settings.webhook_allowed_hosts)
        self.concurrency = settings.delivery_concurrency
        self.gate = ReceiverGate(
            per_receiver=min(settings.delivery_host_concurrency, self.concurrency),
            failures_to_open=settings.delivery_breaker_failures,
            cooldown=settings.delivery_breaker_cooldown,
        )
        self.lease = max(MIN_LEASE_SECONDS, 3 * settings.webhook_timeout)
        self.secret: str | None = None
        self.running: dict[asyncio.Task[None], DeliveryRow] = {}
        """Attempts in flight, by task."""
        self._pool: ThreadPoolExecutor | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.delivered = 0
        self.failed_attempts = 0

    async def run(self, shutdown: asyncio.Event) -> None:
        """Deliver until ``shutdown``; unfinished attempts are released, to be tried again."""
        settings = self.ctx.settings
        self.secret = await retry_db(
            lambda: webhook_secret(self.ctx), "load the webhook secret", shutdown=shutdown
        )
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="result-handler")
        timeout = httpx.Timeout(
            settings.webhook_timeout, connect=min(5.0, settings.webhook_timeout)
        )
        async with httpx.AsyncClient(
            timeout=timeout, follow_redirects=False, trust_env=False
        ) as self.client:
            try:
                while not shutdown.is_set():
                    await self._claim_and_start()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(shutdown.wait(), settings.delivery_poll_interval)
            finally:
                # Webhook attempts stop when cancelled: hand them back so a restart need not
                # wait out their leases. A handler's thread cannot be stopped: its lease stays.
                webhooks = [d.id for d in self.running.values() if d.kind == "webhook"]
                tasks = list(self.running) + list(self._background)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self._pool.shutdown(wait=False, cancel_futures=True)
                await self._release(webhooks)

    async def _release(self, ids: list[str]) -> None:
        if not ids:
            return
        try:
            async with self.ctx.sessions() as session, session.begin():
                await outbox.release(session, ids, self.ctx.instance_id)
        except Exception as exc:  # the leases expire on their own
            log.warning("deliveries: could not release leases at shutdown (%s)", describe(exc))

    async def _claim_and_start(self) -> None:
        free = self.concurrency - len(self.running)
        stuck = self.gate.open_receivers()
        if free <= 0 and not stuck:
            return
        claimed: Sequence[DeliveryRow] = []
        try:
            gave_up, claimed = await lifecycle.claim_deliveries(
                self.ctx, lease=self.lease, limit=free, receivers=self.gate.limits(), stuck=stuck
            )
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("deliveries: database unavailable (%s)", describe(exc)[:200])
            return
        if gave_up:
            log.warning(
                "deliveries: %d reached their retry horizon while their receiver's circuit "
                "was open; failed",
                gave_up,
            )
        for delivery in claimed:
            self.gate.started(delivery.receiver)
            task = asyncio.create_task(self._attempt(delivery), name=f"delivery {delivery.id}")
            self.running[task] = delivery
            task.add_done_callback(lambda done: self.running.pop(done, None))

    async def _attempt(self, delivery: DeliveryRow) -> None:
        with bound(
            worker=self.ctx.instance_id, batch_id=delivery.batch_id, delivery_id=delivery.id
        ):
            await self._attempt_bound(delivery)

    async def _attempt_bound(self, delivery: DeliveryRow) -> None:
        started = time.time()
        keeper = asyncio.create_task(self._keep_lease(delivery))
        ended: Outcome | None = None  # stays None if cancelled
        try:
            try:
                outcome = await self._run(delivery)
            except Exception as exc:
                log.exception("delivery %s (%s) crashed", delivery.id, delivery.target)
                outcome = Outcome(False, error=f"{type(exc).__name__}: {exc}"[:1000])
            ended = outcome
        finally:
            keeper.cancel()
            if self.gate.finished(delivery.receiver, ended):
                self._breaker_opened(delivery.receiver)
        await self._record(delivery, outcome, started)

    def _breaker_opened(self, receiver: str) -> None:
        """Log, count, and move the receiver's waiting deliveries past its cool-down."""
        reopens = self.gate.breaker(receiver).reopens_at() or time.monotonic()
        until = time.time() + max(0.0, reopens - time.monotonic())
        log.warning(
            "deliveries: receiver %s failed %d times in a row; circuit open, next try in %.0f s",
            receiver,
            self.gate.breaker(receiver).failures,
            until - time.time(),
        )
        metrics.delivery_breaker_opened(receiver.partition(":")[0])
        task = asyncio.create_task(self._defer(receiver, until), name=f"defer {receiver}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _defer(self, receiver: str, until: float) -> None:
        try:
            async with self.ctx.sessions() as session, session.begin():
                moved = await outbox.defer_receiver(session, receiver, until=until, now=time.time())
        except Exception as exc:  # the claim skips the receiver anyway while it is open
            log.warning("deliveries: could not defer %s (%s)", receiver, describe(exc)[:200])
            return
        if moved:
            log.info("deliveries: %d waiting for %s deferred past its cool-down", moved, receiver)

    async def _keep_lease(self, delivery: DeliveryRow) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            with contextlib.suppress(Exception):
                async with self.ctx.sessions() as session, session.begin():
                    await outbox.renew_lease(
                        session, delivery.id, self.ctx.instance_id, time.time() + self.lease
                    )

    def _run(self, delivery: DeliveryRow) -> Coroutine[Any, Any, Outcome]:
        if delivery.kind == "webhook":
            return self._webhook(delivery)
        return self._handler(delivery)

    async def _webhook(self, delivery: DeliveryRow) -> Outcome:
        assert self.secret is not None
        body = event_body(
            delivery.event_id, delivery.event_type, int(delivery.created_at), delivery.batch_id
        )
        return await deliver(
            self.client,
            delivery.target,
            secret=self.secret,
            event_id=delivery.event_id,
            body=body,
            allow=self.allow,
        )

    async def _handler(self, delivery: DeliveryRow) -> Outcome:
        handler = self.ctx.deliveries.handlers.get(delivery.target)
        if handler is None:
            return Outcome(
                False, error=f"handler {delivery.target!r} is not loaded in this process"
            )
        info = await self._batch_info(delivery.batch_id)
        if info is None:
            return Outcome(False, error="the batch no longer exists", permanent=True)
        results = ResultStream(self.ctx.storage, info)
        loop = asyncio.get_running_loop()
        call = contextvars.copy_context().run  # the handler's log lines carry batch_id too
        return await loop.run_in_executor(
            self._pool,
            call,
            _run_handler,
            handler,
            delivery.batch_id,
            results,
            dict(info.metadata),
        )

    async def _batch_info(self, batch_id: str) -> BatchInfo | None:
        async with self.ctx.read_sessions() as session:
            batch = await queries.get_batch(session, batch_id)
            if batch is None:
                return None
            keys: dict[str, str | None] = {}
            for name, file_id in (("output", batch.output_file_id), ("error", batch.error_file_id)):
                row = await queries.get_file(session, file_id) if file_id else None
                keys[name] = row.storage_key if row is not None else None
        return BatchInfo(
            id=batch.id,
            status=str(batch.status),  # a plain str for handlers, as before
            endpoint=batch.endpoint,
            model=batch.model,
            metadata=dict(batch.metadata_ or {}),
            output_file_id=batch.output_file_id,
            error_file_id=batch.error_file_id,
            output_key=keys["output"],
            error_key=keys["error"],
            request_counts={
                "total": batch.total,
                "completed": batch.completed,
                "failed": batch.failed,
            },
        )

    async def _record(self, delivery: DeliveryRow, outcome: Outcome, started: float) -> None:
        finished = time.time()
        settings = self.ctx.settings
        next_at: float | None = None
        if not outcome.ok and not outcome.permanent:
            next_at = finished + backoff_delay(
                delivery.attempts + 1, settings.delivery_backoff_base, settings.delivery_backoff_max
            )
            if next_at > delivery.give_up_at:
                next_at = None
        attempt = outbox.Attempt(
            started_at=started,
            finished_at=finished,
            ok=outcome.ok,
            status_code=outcome.status_code,
            error=outcome.error,
        )

        async def write() -> DeliveryStatus | None:
            try:
                return await lifecycle.record_delivery(
                    self.ctx, delivery, attempt, next_attempt_at=next_at
                )
            except IllegalTransition:
                return None  # the lease was lost: another process runs it now

        status = await retry_db(write, f"record delivery {delivery.id}")
        metrics.delivery_attempt(
            delivery.kind,
            "lease_lost" if status is None else ATTEMPT_OUTCOMES[status],
            finished - started,
        )
        if outcome.ok:
            self.delivered += 1
        else:
            self.failed_attempts += 1
        if status is None:
            log.warning("delivery %s: lease lost; attempt not recorded", delivery.id)
        elif not outcome.ok:
            log.warning(
                "delivery %s to %s %s (attempt %d): %s",
                delivery.id,
                delivery.target if delivery.kind == "handler" else "webhook",
                "will retry" if status == DeliveryStatus.PENDING else "gave up",
                delivery.attempts + 1,
                outcome.error,
            )
