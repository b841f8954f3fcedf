"""The work table's claims in-process, on a real PostgreSQL."""

from __future__ import annotations

import datetime
import threading

import pytest
from sqlalchemy import delete, insert
from test_integration_guard import open_db

from jobrunner import tables
from jobrunner.outage import Outage
from jobrunner.worktable import LANES, WorkTableFeed, encode

pytestmark = pytest.mark.postgres


def test_a_claim_refused_by_a_concurrent_claim_is_made_again_and_counted(pg_url, tmp_path):
    """A claim at REPEATABLE READ that meets rows another claim deleted and
    committed since its snapshot is refused (40001): it is claimed again in a
    fresh transaction, takes what is still there, and counts one retry."""
    database = open_db(pg_url, tmp_path)
    try:
        with database.own_engine.begin() as conn:
            run_id = conn.execute(
                insert(tables.runs)
                .values(
                    job="job",
                    status="running",
                    started_at=datetime.datetime(2026, 1, 1),
                    host="h",
                    pid=1,
                    workers=1,
                )
                .returning(tables.runs.c.id)
            ).scalar_one()
            # Two rows in every lane: whichever lane the claim starts in, its
            # first row is one that the other claim takes.
            rows = [{"run_id": run_id, "seq": seq, "item": encode(seq)} for seq in range(2 * LANES)]
            conn.execute(insert(tables.work), rows)
        retries: list[int] = []
        feed = WorkTableFeed(
            database, run_id, stop=threading.Event(), outage=Outage(database.probe, 10), leader=False
        )
        feed.count_retry = retries.append
        session = database.session()
        try:
            session.connection()  # the item's transaction begins: its snapshot is fixed below
            assert session.execute(tables.work.select().limit(1)).first() is not None
            with database.own_engine.begin() as other:  # the other claim, committed
                other.execute(delete(tables.work).where(tables.work.c.seq < LANES))
            [(item, seq)] = feed.take(session, 1)
            assert seq >= LANES and item == seq  # what was still there
            assert retries == [1]
            session.rollback()
        finally:
            session.close()
    finally:
        database.dispose()
