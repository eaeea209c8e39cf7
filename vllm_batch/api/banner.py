"""The startup banner: once the server is ready, where it is and how to try it.

On a console it is a few plain lines on stdout; in JSON mode it is one log line (logger
``vllm_batch.api.banner``) carrying ``url``, ``dashboard``, ``models`` and ``example``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass
from typing import Any

from vllm_batch.config import Settings

log = logging.getLogger(__name__)
WILDCARD_DISPLAY = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}
READY_POLL_SECONDS = 0.25


@dataclass(frozen=True)
class Banner:
    url: str
    models: list[str]
    key_required: bool

    @property
    def dashboard(self) -> str:
        return f"{self.url}/dashboard"

    @property
    def curl(self) -> str:
        auth = ' -H "Authorization: Bearer $VLLM_BATCH_API_KEY"' if self.key_required else ""
        return f"curl -s{auth} {self.url}/v1/models"

    @property
    def sdk(self) -> str:
        key = "<your key>" if self.key_required else "none"
        return f'OpenAI(base_url="{self.url}/v1", api_key="{key}")'

    def lines(self) -> list[str]:
        return [
            f"vLLM Batch Server is ready on {self.url}",
            f"  dashboard  {self.dashboard}",
            f"  models     {', '.join(self.models)}",
            f"  try        {self.curl}",
            f"  python     from openai import OpenAI; client = {self.sdk}",
        ]

    def fields(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "dashboard": self.dashboard,
            "models": self.models,
            "example": self.curl,
            "python": f"from openai import OpenAI; client = {self.sdk}",
        }


def make_banner(settings: Settings, key_required: bool) -> Banner:
    """The banner for ``settings``; a wildcard bind is shown as its loopback address."""
    host = settings.host
    host = WILDCARD_DISPLAY.get(host, f"[{host}]" if ":" in host else host)
    return Banner(f"http://{host}:{settings.port}", settings.served_model_names, key_required)


def emit(banner: Banner, fmt: str) -> None:
    """Console: plain lines on stdout. JSON: one structured log line."""
    if fmt == "console":
        print("\n".join(banner.lines()), file=sys.stdout, flush=True)
    else:
        log.info("ready: %s", banner.url, extra={"event": "ready", **banner.fields()})


async def announce_when_ready(app: Any, banner: Banner, fmt: str) -> None:
    """Wait until the in-process worker's engine is loaded (if there is one), then emit."""
    ctx = app.state.ctx
    while (status := ctx.worker_status()) is not None and status.loaded_model is None:
        await asyncio.sleep(READY_POLL_SECONDS)
    emit(banner, fmt)
