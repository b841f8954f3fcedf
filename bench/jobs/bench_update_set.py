"""Benchmark: the UPDATE job, set-based: one statement per chunk (process_batch)."""

from sqlalchemy import bindparam, text

ONE = text("UPDATE bench_rows SET n = n + 1 WHERE id = :id")
MANY = text("UPDATE bench_rows SET n = n + 1 WHERE id IN :ids").bindparams(bindparam("ids", expanding=True))


def items(ctx, session):
    return range(1, int(ctx.params.get("n", 20000)) + 1)


def process(ctx, session, item):
    session.execute(ONE, {"id": item})


def process_batch(ctx, session, items):
    session.execute(MANY, {"ids": list(items)})
