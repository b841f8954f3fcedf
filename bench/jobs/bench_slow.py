"""Benchmark: slow items that record when each one ran (lock takeover)."""

import time

from sqlalchemy import text


def setup(ctx, session):
    session.execute(text("CREATE TABLE IF NOT EXISTS bench_marks (pid INTEGER, at DOUBLE PRECISION)"))


def items(ctx, session):
    return range(int(ctx.params.get("n", 1000)))


def process(ctx, session, item):
    import os

    if ctx.params.get("touch_db", "1") == "0":  # only the guard holds a transaction
        time.sleep(float(ctx.params.get("sleep", 0.05)))
        return
    session.execute(text("INSERT INTO bench_marks VALUES (:p, :t)"), {"p": os.getpid(), "t": time.time()})
    time.sleep(float(ctx.params.get("sleep", 0.05)))
