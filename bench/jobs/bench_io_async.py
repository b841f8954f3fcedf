"""Benchmark: each item awaits 100 ms on a remote call, then does one UPDATE (asyncio)."""

import asyncio

from sqlalchemy import text


async def items(ctx, session):
    return range(1, int(ctx.params.get("n", 20000)) + 1)


async def prepare(ctx, item):
    await asyncio.sleep(float(ctx.params.get("wait", 0.1)))  # the remote call
    return item


async def process(ctx, session, item):
    await session.execute(text("UPDATE bench_rows SET n = n + 1 WHERE id = :id"), {"id": item})


async def process_batch(ctx, session, items):
    await session.execute(
        text("UPDATE bench_rows SET n = n + 1 WHERE id = :id"), [{"id": item} for item in items]
    )
