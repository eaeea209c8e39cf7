"""The Ray executor: one model served by N Ray actors, each holding the project's own engine.

``RayEngine`` is an ``Engine`` like any other, so leases, saves, exactly-once and resume
stay above it unchanged (the worker and ``vllm-batch run`` hand it requests as they would
to the in-process engine). Each request goes to the least-loaded live replica
(``ray_replica.EngineReplica``, an async actor).

A replica whose process dies is restarted by Ray (up to ``ray_max_restarts`` times); its
in-flight requests are sent again, to another live replica or to it once its engine is
back. A request's result is returned once, so nothing is duplicated. Only when no replica
can come back does ``run`` raise ``EngineFailure`` (the worker hands its chunks back and
restarts the engine: new actors).

Where the cluster is: ``ray_cluster`` (``ray_address``).

Ray is imported only in ``start``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from vllm_batch.config import ModelSpec, Settings
from vllm_batch.engines.engine import EngineFailure, EngineResult, MaxNumSeqs
from vllm_batch.engines.ray_cluster import NAMESPACE, RayConnection
from vllm_batch.engines.ray_replica import EngineReplica, ReplicaInfo

log = logging.getLogger(__name__)

STOP_TIMEOUT_SECONDS = 30.0
UNAVAILABLE_RETRY_SECONDS = 1.0
UNAVAILABLE_RETRIES = 120
"""How long a replica may stay unreachable (not dead) before it is given up on."""
MAX_CONCURRENCY = 100_000
"""Requests one actor accepts at once: never the limit (the worker's window is)."""


@dataclass(frozen=True)
class ReplicaPlan:
    """How many replicas, and what each one reserves in the cluster."""

    count: int
    num_cpus: float
    num_gpus: float


def plan_replicas(settings: Settings, cluster: dict[str, float]) -> ReplicaPlan:
    """Replica count and resources from the settings and the cluster's total resources.

    GPUs per replica default to ``tensor_parallel_size`` on a cluster with GPUs (0 without);
    the count defaults to as many replicas as the cluster's GPUs hold, or one without GPUs.
    """
    gpus = settings.ray_gpus_per_replica
    if gpus is None:
        gpus = float(settings.tensor_parallel_size) if cluster.get("GPU", 0) > 0 else 0.0
    count = settings.ray_replicas
    if count is None:
        count = max(1, int(cluster.get("GPU", 0) // gpus)) if gpus > 0 else 1
    return ReplicaPlan(count, settings.ray_cpus_per_replica, gpus)


@dataclass
class Replica:
    """One actor and what the engine knows of it."""

    index: int
    handle: Any
    info: ReplicaInfo | None = None
    state: Literal["up", "restarting", "dead"] = "up"
    in_flight: int = 0
    revive: asyncio.Task[None] | None = field(default=None, repr=False)


class RayEngine(MaxNumSeqs):
    """One model on ``ray_replicas`` Ray actors; ``run`` never raises for a bad request.

    Resizable: a lower ``max_num_seqs`` reaches every replica on the next ``start``.
    """

    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        super().__init__(settings.max_num_seqs)
        self.model_name = spec.name
        self._spec = spec
        self._settings = settings
        self._replicas: list[Replica] = []
        self._changed = asyncio.Event()
        self._connection = RayConnection(settings.ray_address)

    @property
    def max_in_flight(self) -> int:
        """The replicas' windows added up (twice ``max_num_seqs`` each before they start)."""
        known = [r.info.max_in_flight for r in self._replicas if r.info is not None]
        return sum(known) if known else 2 * self._max_num_seqs

    @property
    def replicas(self) -> list[Replica]:
        return list(self._replicas)

    async def start(self) -> None:
        """Connect to (or start) Ray, create the replicas and wait for their engines.

        A failed or cancelled start kills the actors it created.
        """
        try:
            await self._connection.open()
            await self._start_replicas()
        except BaseException:
            self._kill_all()
            await self._connection.close()
            raise

    async def _start_replicas(self) -> None:
        import ray

        plan = plan_replicas(self._settings, ray.cluster_resources())
        log.info(
            "starting %d Ray replica(s) of %s (%.1f CPU, %.1f GPU each)",
            plan.count,
            self.model_name,
            plan.num_cpus,
            plan.num_gpus,
        )
        actor = ray.remote(EngineReplica).options(  # type: ignore[attr-defined]
            num_cpus=plan.num_cpus,
            num_gpus=plan.num_gpus,
            max_restarts=self._settings.ray_max_restarts,
            max_task_retries=0,  # in-flight requests are re-sent here, not by Ray
            max_concurrency=MAX_CONCURRENCY,
            scheduling_strategy="SPREAD",
            namespace=NAMESPACE,
        )
        self._replicas = [
            Replica(i, actor.remote(self._spec, self._settings, self._max_num_seqs_cap))
            for i in range(plan.count)
        ]
        infos = await asyncio.gather(*(r.handle.start.remote() for r in self._replicas))
        for replica, info in zip(self._replicas, infos, strict=True):
            replica.info = info
        seqs = [info.max_num_seqs for info in infos if info.max_num_seqs is not None]
        if seqs:
            self._max_num_seqs = min(seqs)
        log.info(
            "Ray replicas ready for %s: %s",
            self.model_name,
            ", ".join(f"pid {i.pid} on {i.host}" for i in infos),
        )

    async def stop(self) -> None:
        """Stop every replica's engine, then the actors (and a local Ray instance we started)."""
        replicas, self._replicas = self._replicas, []
        for replica in replicas:
            if replica.revive is not None:
                replica.revive.cancel()
        live = [r for r in replicas if r.state != "dead"]
        if live:
            await asyncio.wait(
                [asyncio.ensure_future(_quietly(r.handle.stop.remote())) for r in live],
                timeout=STOP_TIMEOUT_SECONDS,
            )
        self._kill(replicas)
        await self._connection.close()

    def _kill_all(self) -> None:
        replicas, self._replicas = self._replicas, []
        self._kill(replicas)

    @staticmethod
    def _kill(replicas: list[Replica]) -> None:
        if not replicas:
            return
        import ray

        for replica in replicas:
            with contextlib.suppress(Exception):
                ray.kill(replica.handle, no_restart=True)

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> EngineResult:
        """Run on the least-loaded live replica; re-send if that replica's process died."""
        from ray.exceptions import RayActorError, RayTaskError

        while True:
            replica = await self._pick()
            ref = replica.handle.run.remote(url, body, request_id)
            replica.in_flight += 1
            try:
                return await ref  # type: ignore[no-any-return]
            except asyncio.CancelledError:
                import ray

                with contextlib.suppress(Exception):  # the replica may be gone already
                    ray.cancel(ref)  # aborts the request in the replica's engine
                raise
            except RayActorError as exc:
                log.debug("Ray replica %d lost request %s: %s", replica.index, request_id, exc)
                self._lost(replica, exc)
            except RayTaskError as exc:
                raise exc.cause from None  # EngineFailure, or what the engine raised
            finally:
                replica.in_flight -= 1

    async def _pick(self) -> Replica:
        """The live replica with the fewest requests; waits while all are restarting."""
        while True:
            up = [r for r in self._replicas if r.state == "up"]
            if up:
                return min(up, key=lambda r: r.in_flight)
            if not any(r.state == "restarting" for r in self._replicas):
                raise EngineFailure(f"no Ray replica of {self.model_name} is left")
            self._changed.clear()
            await self._changed.wait()

    def _lost(self, replica: Replica, exc: Exception) -> None:
        """``replica``'s process died: wait (in the background) until Ray restarts it."""
        if replica.state != "up":
            return
        log.warning(
            "Ray replica %d died (%s); its requests are sent again once a replica is up",
            replica.index,
            first_line(exc),
        )
        replica.state = "restarting"
        replica.revive = asyncio.create_task(self._revive(replica))

    async def _revive(self, replica: Replica) -> None:
        """Start the restarted actor's engine; mark it dead if Ray gave up on it."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        try:
            for _ in range(UNAVAILABLE_RETRIES):
                try:
                    replica.info = await replica.handle.start.remote()
                except ActorUnavailableError:
                    await asyncio.sleep(UNAVAILABLE_RETRY_SECONDS)
                    continue
                replica.state = "up"
                log.info("Ray replica %d is back (pid %d)", replica.index, replica.info.pid)
                return
            replica.state = "dead"
        except ActorDiedError as exc:
            log.error("Ray replica %d is gone: %s", replica.index, first_line(exc))
            replica.state = "dead"
        except Exception as exc:  # its engine no longer starts
            log.error(
                "Ray replica %d cannot start its engine again: %s", replica.index, first_line(exc)
            )
            replica.state = "dead"
            self._kill([replica])
        finally:
            self._changed.set()


async def _quietly(ref: Any) -> None:
    with contextlib.suppress(Exception):
        await ref


def first_line(exc: BaseException) -> str:
    """The first line of Ray's (long, multi-line) error texts."""
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]
