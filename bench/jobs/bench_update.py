"""Benchmark: UPDATE one row by primary key per item (--param sleep=SECONDS waits first)."""

import time

from sqlalchemy import text

STATEMENT = text("UPDATE bench_rows SET n = n + 1 WHERE id = :id")


def items(ctx, session):
    return range(1, int(ctx.params.get("n", 20000)) + 1)


def process(ctx, session, item):
    pause = float(ctx.params.get("sleep", 0))
    if pause:
        time.sleep(pause)  # I/O outside the database, before the transaction starts
    session.execute(STATEMENT, {"id": item})
