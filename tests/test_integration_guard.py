"""The guard in-process, on real databases: faster than the end-to-end tests,
and able to look at its internals."""

from __future__ import annotations

import datetime
import os
import threading
import time
import types

import pytest
from helpers import query
from sqlalchemy import exc, insert, update

from jobrunner import config as configmod
from jobrunner import db as dbmod
from jobrunner import tables
from jobrunner.attempt import Verdict
from jobrunner.exceptions import LockHeld
from jobrunner.locking import Guard, HelperFence, backend_identity, read_holder
from jobrunner.outage import is_sqlite_busy
from jobrunner.result import Status
from jobrunner.roles import Helping
from jobrunner.stop import Stop


def open_db(url, tmp_path):
    config = configmod.load({"database_url": url}, environ={}, cwd=tmp_path)
    database = dbmod.open_database(config, "job", workers=2)
    tables.ensure_schema(database.own_engine)
    return database


@pytest.fixture
def database(db_url, tmp_path):
    database = open_db(db_url, tmp_path)
    yield database
    database.dispose()


@pytest.fixture
def pg_database(pg_url, tmp_path):
    database = open_db(pg_url, tmp_path)
    yield database
    database.dispose()


def test_second_guard_on_the_same_job_is_refused_with_the_holder(database):
    with Guard(database, "job"):
        with pytest.raises(LockHeld) as held:
            with Guard(database, "job"):
                pass
        assert held.value.holder["pid"] == os.getpid()
        assert str(held.value).startswith(f"job is already running (pid {os.getpid()} on ")
        with Guard(database, "other"):  # locks are per job
            pass
    with Guard(database, "job"):  # released at the end of the block
        pass


def test_a_loser_names_the_run_that_holds_the_lock_not_the_one_before(database, monkeypatch):
    """A run that ends takes its holder row with it: a loser that comes while
    the next winner has the lock but has yet to write its row waits for that
    row, rather than name the run that ended (or no one)."""
    with Guard(database, "job"):
        before = read_holder(database, "job")["since"]
    assert read_holder(database, "job") == {}
    time.sleep(1.1)  # MySQL's DATETIME keeps whole seconds
    write = Guard._write_holder

    def slowly(self):
        time.sleep(1.5)  # longer than the loser's wait used to be
        write(self)

    monkeypatch.setattr(Guard, "_write_holder", slowly)
    winner = Guard(database, "job")
    entered = threading.Thread(target=winner.__enter__)
    entered.start()
    try:
        time.sleep(0.5)  # the lock is taken; its row is not written yet
        monkeypatch.setattr(Guard, "_write_holder", write)
        with pytest.raises(LockHeld) as held:
            with Guard(database, "job"):
                pass
        assert held.value.holder["pid"] == os.getpid()
        assert held.value.holder["since"] > before
    finally:
        entered.join()
        winner.release()


def test_wait_gives_up_after_the_wait(database):
    with Guard(database, "job"):
        t0 = time.monotonic()
        with pytest.raises(LockHeld):
            with Guard(database, "job", wait=0.5):
                pass
        assert time.monotonic() - t0 >= 0.5


def test_wait_takes_the_lock_once_freed(database):
    holder = Guard(database, "job")
    holder.__enter__()
    threading.Timer(0.3, holder.release).start()
    with Guard(database, "job", wait=10) as waiter:
        assert waiter.check()


@pytest.mark.postgres
def test_row_mode_locks_an_existing_row(pg_url, pg_database):
    with Guard(pg_database, "job"):
        assert query(pg_url, "SELECT job FROM jobrunner_locks") == [("job",)]


@pytest.mark.postgres
def test_advisory_mode_excludes_too(pg_database):
    with Guard(pg_database, "job", mode="advisory"):
        with pytest.raises(LockHeld):
            with Guard(pg_database, "job", mode="advisory"):
                pass


@pytest.mark.postgres
def test_terminated_guard_is_noticed_by_the_heartbeat(pg_url, pg_database):
    reasons: list[str] = []
    with Guard(pg_database, "job", heartbeat=0.1, on_lost=reasons.append) as guard:
        killed = query(
            pg_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'jobrunner job lock' "
            f"AND datname = '{pg_url.rsplit('/', 1)[1]}'",
        )
        assert killed == [(True,)]
        assert guard.lost.wait(5)
        assert not guard.check()
    assert reasons and "connection" in reasons[0]


def test_sqlite_busy_is_recognised(tmp_path):
    import sqlite3

    path = tmp_path / "busy.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    engine = dbmod._sqlite_engine(str(path), pool_size=1, timeout=0)
    try:
        with pytest.raises(exc.OperationalError) as info, engine.begin() as conn:
            conn.exec_driver_sql("SELECT 1")
        assert is_sqlite_busy(info.value)
    finally:
        engine.dispose()
        holder.close()


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("ended_as", "helper_stops_with"),
    [("succeeded", None), ("failed", None), ("interrupted", Status.LOCK_LOST), ("crashed", Status.LOCK_LOST)],
)
def test_a_helper_whose_leader_ended_the_run_ends_by_its_own_counts(pg_database, ended_as, helper_stops_with):
    """The leader ends a run once its work table is empty; a helper's heartbeat
    may see that before its workers take their last look at the table. Seen
    in CI: such a helper said the run "ended under" it and exited 69."""
    engine = pg_database.own_engine
    with engine.connect() as leader_lock:  # the leader's lock connection, alive
        _, backend = backend_identity(leader_lock)
        with engine.begin() as conn:
            run_id = conn.execute(
                insert(tables.runs)
                .values(
                    job="job", status="running", started_at=datetime.datetime(2026, 1, 1), host="h", pid=1
                )
                .values(workers=1, leader_backend=backend)
                .returning(tables.runs.c.id)
            ).scalar_one()
        helping = Helping(run_id)
        helping.bind(types.SimpleNamespace(stop=Stop()))  # type: ignore[arg-type]  # the one part _lost uses
        fence = HelperFence(
            pg_database,
            "job",
            run_id,
            heartbeat=0.1,
            on_lost=helping._lost,
            may_retake=lambda: True,
            retake_within=5,
            notice=None,
        )
        helping.fence = fence
        with fence:
            assert fence.verdict(fence.epoch()) is Verdict.COMMIT
            with engine.begin() as conn:
                conn.execute(update(tables.runs).where(tables.runs.c.id == run_id).values(status=ended_as))
            assert fence.lost.wait(5), "the fence did not see the run end"
            # Whatever the ending, nothing of this helper's commits after it.
            assert fence.verdict(fence.epoch()) is Verdict.ABANDON
            assert fence.ended_as == ended_as
    assert helping.r.stop.reason is helper_stops_with
