"""Benchmark: CPU-bound items: --param ms=2 of pure-Python work under the GIL,
then one UPDATE (or a --param sleep=S wait instead, for I/O-bound items)."""

import time

from sqlalchemy import text

STATEMENT = text("UPDATE bench_rows SET n = n + 1 WHERE id = :id")


def items(ctx, session):
    return range(1, int(ctx.params.get("n", 2000)) + 1)


def process(ctx, session, item):
    pause = float(ctx.params.get("sleep", 0))
    if pause:
        time.sleep(pause)
    else:
        deadline = time.thread_time() + float(ctx.params.get("ms", 2)) / 1000
        x = 0
        while time.thread_time() < deadline:  # CPU time of this thread: pure Python, holding the GIL
            for i in range(200):
                x += i * i
    session.execute(STATEMENT, {"id": item})
