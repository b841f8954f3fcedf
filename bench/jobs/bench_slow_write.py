"""Benchmark: read a row, make a slow call (0.2 s), write: in process() (holding
SQLite's write lock) or in prepare() (before the transaction), --param where=."""

import time

from sqlalchemy import text


def setup(ctx, session):
    session.execute(text("CREATE TABLE IF NOT EXISTS slow_rows (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"))
    if not session.execute(text("SELECT count(*) FROM slow_rows")).scalar():
        session.execute(text("INSERT INTO slow_rows VALUES (:i, 0)"), [{"i": i} for i in range(1000)])


def items(ctx, session):
    return range(int(ctx.params.get("n", 50)))


def prepare(ctx, item):
    if ctx.params.get("where") == "prepare":
        time.sleep(float(ctx.params.get("sleep", 0.2)))
    return item


def process(ctx, session, item):
    n = session.execute(text("SELECT n FROM slow_rows WHERE id = :i"), {"i": item}).scalar()
    if ctx.params.get("where") == "process":
        time.sleep(float(ctx.params.get("sleep", 0.2)))
    session.execute(text("UPDATE slow_rows SET n = :n WHERE id = :i"), {"n": n + 1, "i": item})
