"""Joining (or starting) the Ray cluster the Ray executor runs on.

``ray.init`` blocks for seconds, so it runs off the event loop, in a thread that lives until
``close``: Ray ties the processes of an instance it starts to the thread that started them
(they get SIGKILL when that thread ends), so a short-lived thread would take them down.

Where (``ray_address``): unset means a private Ray instance on this machine, bound to
loopback, stopped by ``close`` (``RAY_ADDRESS``, if set, is used instead); ``auto`` the
cluster ``ray start`` runs on this machine; ``HOST:PORT`` that cluster's head.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any

log = logging.getLogger(__name__)

NAMESPACE = "vllm_batch"
RAY_ENV_DEFAULTS = {"RAY_USAGE_STATS_ENABLED": "0"}
"""Set (unless already) before Ray starts: no usage reports leave the machine."""
LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""For a private instance: Ray's switch that binds a one-machine instance to 127.0.0.1."""


def init_options(address: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """``ray.init`` keyword arguments and the environment to set first, for ``address``."""
    options: dict[str, Any] = {
        "include_dashboard": False,
        "namespace": NAMESPACE,
        "log_to_driver": True,
    }
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        return {**options, "address": "local"}, {**RAY_ENV_DEFAULTS, **LOCAL_ENV}
    return {**options, "address": address}, dict(RAY_ENV_DEFAULTS)


class RayConnection:
    """This process's connection to Ray, held by a thread from ``open`` until ``close``.

    If Ray is already initialised in this process (by someone else), it is used as it is
    and left alone by ``close``.
    """

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._thread: threading.Thread | None = None
        self._release = threading.Event()

    async def open(self) -> None:
        options, env = init_options(self.address)
        for key, value in env.items():  # before Ray is imported: it reads some at import
            os.environ.setdefault(key, value)
        import ray

        if ray.is_initialized():
            return
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def report(error: BaseException | None) -> None:
            if ready.done():
                return
            if error is None:
                ready.set_result(None)
            else:
                ready.set_exception(error)

        def hold() -> None:
            try:
                ray.init(**options)
            except BaseException as exc:
                loop.call_soon_threadsafe(report, exc)
                return
            loop.call_soon_threadsafe(report, None)
            self._release.wait()
            ray.shutdown()

        self._thread = threading.Thread(target=hold, name="ray-connection", daemon=True)
        self._thread.start()
        await asyncio.shield(ready)
        where = options["address"]
        log.info("Ray: %s", "started a private instance" if where == "local" else f"joined {where}")

    async def close(self) -> None:
        """Disconnect (a private instance stops); waits for ``ray.shutdown`` off the loop."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._release.set()
        await asyncio.to_thread(thread.join)
