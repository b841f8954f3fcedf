"""Benchmark: one UPDATE per item, or one executemany per chunk (threads)."""

from sqlalchemy import text


def items(ctx, session):
    return range(1, int(ctx.params.get("n", 20000)) + 1)


def process(ctx, session, item):
    session.execute(text("UPDATE bench_rows SET n = n + 1 WHERE id = :id"), {"id": item})


def process_batch(ctx, session, items):
    session.execute(text("UPDATE bench_rows SET n = n + 1 WHERE id = :id"), [{"id": item} for item in items])
