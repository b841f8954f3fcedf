"""The work table's claims in-process, on a real PostgreSQL."""

from __future__ import annotations

import datetime

import pytest
from sqlalchemy import insert
from test_integration_guard import open_db

from jobrunner import tables
from jobrunner.worktable import CLAIM_ANY, CLAIM_LANE, LANES, RECLAIM, decode, encode

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
