"""Benchmark: each item is one TPC-B transaction on pgbench's tables (the
accounts, tellers and branches rows it picks, and a history row), the same
kind pgbench runs beside it. An item's rows and delta follow from the item
alone, so a retried item does the same transaction again, and its history
row (filler "jr <item>") says whether it was applied once."""

import random

from sqlalchemy import text

ACCOUNT = text("UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid")
BALANCE = text("SELECT abalance FROM pgbench_accounts WHERE aid = :aid")
TELLER = text("UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid")
BRANCH = text("UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid")
HISTORY = text(
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime, filler) "
    "VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP, :filler)"
)


def items(ctx, session):
    return range(int(ctx.params.get("n", 20000)))


def process(ctx, session, item):
    scale = int(ctx.params.get("scale", 10))
    pick = random.Random(item)
    row = {
        "aid": pick.randint(1, 100000 * scale),
        "tid": pick.randint(1, 10 * scale),
        "bid": pick.randint(1, scale),
        "delta": pick.randint(-5000, 5000),
        "filler": f"jr {item}",
    }
    session.execute(ACCOUNT, row)
    session.scalar(BALANCE, row)
    session.execute(TELLER, row)
    session.execute(BRANCH, row)
    session.execute(HISTORY, row)
