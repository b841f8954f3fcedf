"""Benchmark: UPDATE one row by primary key per item; every item whose id is
a multiple of --param every=N (0: none) raises after its UPDATE."""

from sqlalchemy import text

STATEMENT = text("UPDATE bench_rows SET n = n + 1 WHERE id = :id")


def items(ctx, session):
    return range(1, int(ctx.params.get("n", 50000)) + 1)


def process(ctx, session, item):
    session.execute(STATEMENT, {"id": item})
    every = int(ctx.params.get("every", 0))
    if every and item % every == 0:
        raise ValueError(f"item {item} is bad")
