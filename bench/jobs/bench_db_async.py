"""Benchmark: one UPDATE per item, or one executemany per chunk (asyncio)."""

from sqlalchemy import text


async def items(ctx, session):
    return range(1, int(ctx.params.get("n", 20000)) + 1)


async def process(ctx, session, item):
    await session.execute(text("UPDATE bench_rows SET n = n + 1 WHERE id = :id"), {"id": item})


async def process_batch(ctx, session, items):
    await session.execute(
        text("UPDATE bench_rows SET n = n + 1 WHERE id = :id"), [{"id": item} for item in items]
    )
