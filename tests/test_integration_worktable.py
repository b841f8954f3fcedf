"""The work table's claims in-process, on a real PostgreSQL."""

from __future__ import annotations

import datetime
import threading

import pytest
from sqlalchemy import insert, text
from test_integration_guard import open_db

from jobrunner import tables
from jobrunner.outage import Outage
from jobrunner.worktable import CLAIM_ANY, CLAIM_LANE, LANES, RECLAIM, WorkTableFeed, decode, encode

pytestmark = pytest.mark.postgres


def _run_with_rows(database, seqs) -> int:
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
        conn.execute(
            insert(tables.work), [{"run_id": run_id, "seq": seq, "item": encode(seq)} for seq in seqs]
        )
    return run_id


def _take(database, run_id: int, seq: int):
    """Row ``seq`` claimed in a transaction of its own, left open: its connection."""
    conn = database.own_engine.connect()
    assert conn.execute(RECLAIM, {"run_id": run_id, "seqs": [seq]}).scalars().all() == [seq]
    return conn


def test_a_claim_skips_rows_another_claim_took_since_its_snapshot_without_an_error(
    pg_url, pg_server_log, tmp_path
):
    """A claim at REPEATABLE READ sees, in its snapshot, rows that another
    claim deleted and committed since; locking one would fail (40001, an
    ERROR line in the server's log). It skips them, and rows held by a claim
    in progress, and takes what is free, including a row a claim gave back
    (rolled back) before its snapshot. A row given back by a later
    transaction waits for a claim with a newer snapshot."""
    database = open_db(pg_url, tmp_path)
    log_from = pg_server_log.stat().st_size if pg_server_log is not None else 0
    try:
        # Lane 0 only, so one claim meets every case in seq order.
        seqs = [LANES * i for i in range(8)]
        run_id = _run_with_rows(database, seqs)
        given_back_before = _take(database, run_id, seqs[0])
        given_back_before.rollback()
        given_back_before.close()
        session = database.session()
        try:
            session.connection()  # the item's transaction begins: its snapshot is fixed below
            assert session.execute(tables.work.select().limit(1)).first() is not None
            taken_since = _take(database, run_id, seqs[1])
            taken_since.commit()
            taken_since.close()
            given_back_since = _take(database, run_id, seqs[3])
            given_back_since.rollback()
            given_back_since.close()
            in_progress = _take(database, run_id, seqs[2])
            try:
                # The claims as the feed makes them, in the old snapshot.
                lane = {"run_id": run_id, "limit": 3, "lane": 0, "after": -1}
                claimed = sorted(session.execute(CLAIM_LANE, lane).all())
                again = session.execute(RECLAIM, {"run_id": run_id, "seqs": seqs[1:4]}).all()
            finally:
                in_progress.rollback()
                in_progress.close()
            assert [seq for seq, _ in claimed] == [seqs[0], seqs[4], seqs[5]]
            assert [decode(item) for _, item in claimed] == [seqs[0], seqs[4], seqs[5]]
            assert again == []
            session.rollback()
        finally:
            session.close()
        session = database.session()
        try:
            # A fresh snapshot, nothing held: all but the row taken for good.
            left = session.execute(CLAIM_ANY, {"run_id": run_id, "limit": 10}).all()
            assert sorted(seq for seq, _ in left) == [seqs[0], *seqs[2:]]
            session.rollback()
        finally:
            session.close()
    finally:
        database.dispose()
    if pg_server_log is not None:
        with pg_server_log.open(errors="replace") as log:
            log.seek(log_from)
            assert "could not serialize" not in log.read()


def test_a_claim_refused_all_the_same_is_made_again_in_a_fresh_transaction_and_counted(pg_url, tmp_path):
    """Should the server refuse a claim (40001) all the same, the feed claims
    again at once, in a fresh transaction, and counts one in ``retried``.
    Made to happen here through the claim's own commit count: a row for this
    connection that a transaction committed since the snapshot."""
    database = open_db(pg_url, tmp_path)
    try:
        run_id = _run_with_rows(database, range(LANES))  # whichever lane it starts in holds a row
        retries: list[int] = []
        feed = WorkTableFeed(
            database, run_id, stop=threading.Event(), outage=Outage(database.probe, 10), leader=False
        )
        feed.count_retry = retries.append
        session = database.session()
        try:
            backend = session.execute(text("SELECT pg_backend_pid()")).scalar_one()  # the snapshot
            with database.own_engine.begin() as other:
                other.execute(insert(tables.chunk_commits).values(run_id=run_id, backend=backend, commits=5))
            claimed = feed.take(session, 3)
            assert claimed is not None and len(claimed) == 1  # one lane's row
            assert retries == [1]
            session.commit()
        finally:
            session.close()
        with database.own_engine.connect() as conn:
            total = "SELECT sum(commits) FROM jobrunner_chunk_commits WHERE run_id = :r"
            assert conn.execute(text(total), {"r": run_id}).scalar() == 5 + 1, (
                "one commit: the refused claim's count was undone"
            )
    finally:
        database.dispose()
