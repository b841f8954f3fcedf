"""Benchmark: each item waits 100 ms on a remote call, then does one UPDATE (threads)."""

import time

from sqlalchemy import text


def items(ctx, session):
    return range(1, int(ctx.params.get("n", 20000)) + 1)


def prepare(ctx, item):
    time.sleep(float(ctx.params.get("wait", 0.1)))  # the remote call
    return item


def process(ctx, session, item):
    session.execute(text("UPDATE bench_rows SET n = n + 1 WHERE id = :id"), {"id": item})
