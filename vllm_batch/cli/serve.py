"""``vllm-batch serve``: the API server (and, by default, an in-process worker)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
from pathlib import Path
from typing import Any

import typer

from vllm_batch.cli import options as o
from vllm_batch.cli.build import engine_settings, setup_logging
from vllm_batch.cli.models import ensure_served_models
from vllm_batch.config import Settings

SERVE_FLAGS = (
    o.HOST,
    o.PORT,
    *o.STORE_FLAGS,
    o.API_KEY,
    o.API_KEY_FILE,
    o.API_KEYS_FILE,
    o.WORKER,
    o.CHUNK_SIZE,
    *o.ENGINE_FLAGS,
)


@o.command(*SERVE_FLAGS)
def serve(given: o.Given) -> None:
    """Run the API server (and, by default, an in-process worker)."""
    if given["api_key_file"] is not None:
        if given["api_key"] is not None:
            raise typer.BadParameter("give --api-key or --api-key-file, not both")
        given.values["api_key"] = read_api_key_file(given["api_key_file"])
    settings = engine_settings(given)
    from vllm_batch.api.auth import KeyConfigError, KeyRing

    try:
        keys = KeyRing.from_settings(settings)
    except KeyConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="API keys") from None
    fmt = setup_logging(settings, keys.secrets())
    run_server(settings, keys.enabled, fmt)


def run_server(settings: Settings, key_required: bool, fmt: str) -> None:
    """uvicorn with our logging (its access log replaced by ours); the banner once ready.

    First, the models its worker will load: the default one is prepared on first use."""
    ensure_served_models(settings)
    import uvicorn
    from uvicorn.server import STARTUP_FAILURE

    from vllm_batch.api.app import create_app
    from vllm_batch.api.banner import announce_when_ready, make_banner
    from vllm_batch.api.connections import server_config

    log = logging.getLogger("vllm_batch.serve")
    banner = make_banner(settings, key_required)
    log.info("starting on %s (models: %s)", banner.url, ", ".join(banner.models))
    app = create_app(settings)

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            if sys.flags.dev_mode or os.environ.get("PYTHONASYNCIODEBUG"):
                # asyncio's debug mode, as Python documents it (uvicorn turns it off)
                asyncio.get_running_loop().set_debug(True)
            await super().startup(sockets=sockets)
            # What start-up made lives as long as the process: keep it out of the garbage
            # collector's full passes, which otherwise pause every request now and then.
            gc.collect()
            gc.freeze()
            if self.started:
                self.banner_task = asyncio.create_task(announce_when_ready(app, banner, fmt))

    config = server_config(
        app,
        settings,
        host=settings.host,
        port=settings.port,
        log_config=None,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=30,
    )
    server = Server(config)
    server.run()
    if not server.started:  # as uvicorn.run: a failed start (port in use...) exits non-zero
        sys.exit(STARTUP_FAILURE)


def read_api_key_file(path: Path) -> str:
    """The API key stored in ``path``, surrounding whitespace stripped; never empty."""
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise typer.BadParameter(
            f"cannot read {path}: {exc.strerror or exc}", param_hint="--api-key-file"
        ) from None
    if not key:
        raise typer.BadParameter(f"{path} is empty", param_hint="--api-key-file")
    return key
