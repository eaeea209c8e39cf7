"""``vllm-batch webhook-secret``: the signing secret webhook receivers verify events with."""

from __future__ import annotations

import asyncio

import typer

from vllm_batch.cli import options as o
from vllm_batch.cli.build import settings_from


@o.command(o.DATA_DIR, o.DATABASE_URL)
def webhook_secret(given: o.Given) -> None:
    """Print the webhook signing secret (whsec_…) receivers verify events with.

    It is VLLM_BATCH_WEBHOOK_SECRET if set; otherwise the one the server generated and
    keeps in its database (generated now if the server never ran).
    """
    settings = settings_from(given)

    async def read() -> str:
        from vllm_batch.batches.store_context import open_store
        from vllm_batch.deliveries.dispatcher import webhook_secret

        async with open_store(settings) as store:
            return await webhook_secret(store)

    typer.echo(asyncio.run(read()))
