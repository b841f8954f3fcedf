"""The transaction driver in-process, on real databases: a COMMIT whose reply
never arrives, settled by looking, never by guessing. Every effect exactly once.

The session commits for real and then raises the error a connection that died
after COMMIT's reply left the server raises; or raises it before COMMIT was
sent. Only a lookup (PostgreSQL's transaction status, or the item's resume
key) can tell the two apart: redoing the first applies the item twice, and
not redoing the second loses it.
"""

from __future__ import annotations

import types

import psycopg2
import pytest
from helpers import execute, query
from sqlalchemy import exc, make_url, text
from test_integration_guard import open_db

from jobrunner import history
from jobrunner.counters import Counters
from jobrunner.feed import MemoryFeed
from jobrunner.locking import RunFence
from jobrunner.outage import Outage
from jobrunner.stop import Stop
from jobrunner.transaction import TxidCheck, Unit


def lost_connection() -> exc.OperationalError:
    error = exc.OperationalError(
        "COMMIT", {}, psycopg2.OperationalError("server closed the connection unexpectedly")
    )
    error.connection_invalidated = True
    return error


class LosesOneCommitReply:
    """Wraps a session's commit once: ``reached`` says whether the COMMIT reached
    the server before the connection 'died'."""

    def __init__(self, session, *, reached: bool) -> None:
        self.session, self.reached, self.done = session, reached, False
        self.real = session.commit
        session.commit = self

    def __call__(self) -> None:
        if self.done:
            return self.real()
        self.done = True
        if self.reached:
            self.real()
        raise lost_connection()


def drive(database, *, keys=None, commit_check=None, reached: bool):
    """One item through the real Unit; returns (progress, failures)."""
    with database.session() as setup:
        setup.execute(text("CREATE TABLE IF NOT EXISTS effects (item INTEGER NOT NULL)"))
        setup.commit()

    def process(ctx, session, item):
        session.execute(text("INSERT INTO effects VALUES (:i)"), {"i": item})

    unit, progress, failures = one_worker(database, process, keys=keys, commit_check=commit_check)
    session = database.session()
    try:
        LosesOneCommitReply(session, reached=reached)
        unit(session, [(7, None)])
    finally:
        session.close()
    return progress.snapshot(), failures


def one_worker(database, process, *, fence=None, retries=3, keys=None, **extra):
    """The real Unit for ``process`` on ``database``, as one worker of a run
    has it; returns (unit, progress, failures)."""
    stop, progress, failures = Stop(), Counters(), []
    unit = Unit(
        job=types.SimpleNamespace(process=process, process_batch=None, prepare=None),
        ctx=None,
        feed=MemoryFeed(1, stop.event),
        fence=RunFence(None, stop) if fence is None else fence,
        outage=Outage(database.probe, 10),
        stop=stop,
        progress=progress,
        retries=retries,
        keys=keys,
        on_failure=lambda item, token, error, settled: failures.append((item, error)),
        **extra,
    )
    return unit, progress, failures


def effects(url: str) -> list[int]:
    return [item for (item,) in query(url, "SELECT item FROM effects ORDER BY item")]


@pytest.mark.postgres
@pytest.mark.parametrize("reached", [True, False], ids=["committed", "not-committed"])
def test_postgresql_settles_a_lost_commit_reply_by_its_transaction_status(pg_url, tmp_path, reached):
    database = open_db(pg_url, tmp_path)
    try:
        snap, failures = drive(database, commit_check=TxidCheck(), reached=reached)
    finally:
        database.dispose()
    assert failures == []
    assert effects(pg_url) == [7], "the item was applied twice, or lost"
    assert (snap["succeeded"], snap["commits"]) == (1, 1)


@pytest.mark.parametrize("reached", [True, False], ids=["committed", "not-committed"])
def test_a_lost_commit_reply_is_settled_by_the_items_resume_key(db_url, tmp_path, reached):
    database = open_db(db_url, tmp_path)
    try:
        recorder = history.RunRecorder(database, "job", notice=lambda _text: None)
        run_id = recorder.start(dry_run=False, workers=1, batch_size=1, lock="none", resumed_from=None)
        assert run_id is not None
        snap, failures = drive(database, keys=history.KeyRecorder(run_id, str), reached=reached)
    finally:
        database.dispose()
    assert failures == []
    assert effects(db_url) == [7], "the item was applied twice, or lost"
    assert snap["succeeded"] == 1


def test_a_lost_commit_reply_nobody_can_look_up_fails_the_item_rather_than_redo_it(sqlite_url, tmp_path):
    database = open_db(sqlite_url, tmp_path)
    try:
        snap, failures = drive(database, reached=True)
    finally:
        database.dispose()
    assert effects(sqlite_url) == [7], "an item in doubt was redone"
    [(item, error)] = failures
    assert item == 7 and type(error).__name__ == "CommitInDoubt"
    assert snap["succeeded"] == 0


class LostAfterFirstAnswer:
    """A fence that said "commit" once, and then learned that the lock is lost."""

    def __init__(self) -> None:
        self.asked = 0

    def epoch(self) -> int:
        return 0

    def verdict(self, epoch: int, *, wait: bool = True):
        from jobrunner.attempt import Verdict

        self.asked += 1
        return Verdict.COMMIT if self.asked == 1 else Verdict.ABANDON


@pytest.mark.postgres
def test_a_commit_sent_after_another_run_took_the_lock_does_not_land(pg_url, tmp_path):
    """Run A's fence said "commit", and A froze before its COMMIT went out;
    meanwhile run B took the lock. B ends the transactions A left open before
    it reads what was committed, so A's late COMMIT fails, A settles the item
    as not committed, and its fence stops it: the item is B's alone."""
    from jobrunner import locking

    a, b = open_db(pg_url, tmp_path), open_db(pg_url, tmp_path)
    notices: list[str] = []
    try:
        with a.session() as setup:
            setup.execute(text("CREATE TABLE IF NOT EXISTS effects (item INTEGER NOT NULL)"))
            setup.commit()
        recorder = history.RunRecorder(a, "job", notice=lambda _text: None)
        run_id = recorder.start(dry_run=False, workers=1, batch_size=1, lock="row", resumed_from=None)

        def process(ctx, session, item):
            session.execute(text("INSERT INTO effects VALUES (:i)"), {"i": item})

        unit, progress, failures = one_worker(
            a,
            process,
            fence=LostAfterFirstAnswer(),
            keys=history.KeyRecorder(run_id, str),
            # between A's verdict and its COMMIT: B takes the lock and opens its run
            before_commit=lambda _session: locking.end_earlier_writers(b, "job", notices.append),
        )
        with a.session() as session:
            unit(session, [(7, None)])
    finally:
        a.dispose()
        b.dispose()
    assert effects(pg_url) == [], "a COMMIT sent after the takeover landed"
    assert failures == []
    assert progress.snapshot()["succeeded"] == 0
    assert notices and "ended 1 transaction(s)" in notices[-1]


@pytest.mark.postgres
def test_an_item_can_stream_rows_through_a_server_side_cursor(pg_url, tmp_path):
    """``yield_per`` inside an item: psycopg2 refuses a named cursor on an
    autocommit connection unless it is WITH HOLD, and jobrunner sends BEGIN
    itself on such connections (db.own_transactions). A stream the job leaves
    half-read is closed by its item's COMMIT, not kept open on the pooled
    connection, and the next item starts with no cursor."""
    database = open_db(pg_url, tmp_path)
    try:
        with database.session() as setup:
            setup.execute(text("CREATE TABLE effects (item INTEGER NOT NULL)"))
            setup.execute(text("INSERT INTO effects SELECT generate_series(1, 100)"))
            setup.commit()

        seen = []

        def process(ctx, session, item):
            open_before = session.scalar(text("SELECT count(*) FROM pg_cursors"))
            rows = session.execute(text("SELECT item FROM effects").execution_options(yield_per=10))
            whole = sum(1 for _row in rows)
            left_open = session.execute(text("SELECT item FROM effects").execution_options(yield_per=10))
            next(iter(left_open))
            seen.append((open_before, whole))
            session.execute(text("INSERT INTO effects VALUES (:i)"), {"i": item})
            held.append(left_open)  # not closed by the job, not garbage either

        held: list = []
        unit, progress, failures = one_worker(database, process, retries=0, commit_check=TxidCheck())
        with database.session() as session:
            unit(session, [(1000, None)])
            unit(session, [(1001, None)])
    finally:
        database.dispose()
    assert failures == []
    assert seen == [(0, 100), (0, 101)], "a stream outlived its item"
    assert progress.snapshot()["succeeded"] == 2
    assert len(effects(pg_url)) == 102


@pytest.mark.postgres
def test_a_postgresql_item_costs_begin_its_statements_and_commit(pg_url, pg_server_log, tmp_path):
    """The transaction id that settles a commit cut by a restart comes with
    BEGIN, in the same message: no round trip of its own on each commit."""
    if pg_server_log is None:
        pytest.skip("the server's log is not ours to read")
    name = make_url(pg_url).database
    execute(pg_url, f"ALTER DATABASE {name} SET log_statement = 'all'")
    database = open_db(pg_url, tmp_path)
    try:
        with database.session() as setup:
            setup.execute(text("CREATE TABLE effects (item INTEGER NOT NULL)"))
            setup.commit()

        def process(ctx, session, item):
            session.execute(text("INSERT INTO effects VALUES (:i) /* the job's */"), {"i": item})

        unit, progress, failures = one_worker(database, process, retries=0, commit_check=TxidCheck())
        with database.session() as session:
            session.connection()  # the connection's own set-up is not the item's
            session.rollback()
            log_from = pg_server_log.stat().st_size
            unit(session, [(1, None)])
        with pg_server_log.open(errors="replace") as log:
            log.seek(log_from)
            statements = [line.split("statement: ", 1)[1].strip() for line in log if "statement: " in line]
    finally:
        database.dispose()
    assert failures == [] and effects(pg_url) == [1]
    assert progress.snapshot()["succeeded"] == 1
    assert statements == [
        "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT txid_current()",
        "INSERT INTO effects VALUES (1) /* the job's */",
        "COMMIT",
    ]


@pytest.mark.postgres
def test_a_chunks_bounded_lock_wait_comes_in_begins_message(pg_url, pg_server_log, tmp_path):
    """A chunk of two or more items waits for a lock at most 100 ms: the
    setting goes in the same message as BEGIN, so a chunk costs no round trip
    more for it, and the job's statements run under it."""
    if pg_server_log is None:
        pytest.skip("the server's log is not ours to read")
    name = make_url(pg_url).database
    execute(pg_url, f"ALTER DATABASE {name} SET log_statement = 'all'")
    database = open_db(pg_url, tmp_path)
    seen = []
    try:
        with database.session() as setup:
            setup.execute(text("CREATE TABLE effects (item INTEGER NOT NULL)"))
            setup.commit()

        def process(ctx, session, item):
            seen.append(session.scalar(text("SELECT current_setting('lock_timeout') /* the job's */")))
            session.execute(text("INSERT INTO effects VALUES (:i) /* the job's */"), {"i": item})

        unit, progress, failures = one_worker(
            database, process, retries=0, commit_check=TxidCheck(), batch_size=2, bounded_waits=True
        )
        with database.session() as session:
            session.connection()  # the connection's own set-up is not the chunk's
            session.rollback()
            log_from = pg_server_log.stat().st_size
            unit(session, [(1, None), (2, None)])
        with pg_server_log.open(errors="replace") as log:
            log.seek(log_from)
            statements = [line.split("statement: ", 1)[1].strip() for line in log if "statement: " in line]
    finally:
        database.dispose()
    assert failures == [] and effects(pg_url) == [1, 2]
    assert progress.snapshot()["succeeded"] == 2
    assert seen == ["100ms", "100ms"]
    assert statements[0].startswith("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT set_config('lock_timeout'")
    assert statements[0].endswith("; SELECT txid_current()")
    assert [s for s in statements[1:] if "/* the job's */" not in s] == [
        "SAVEPOINT sa_savepoint_1",
        "RELEASE SAVEPOINT sa_savepoint_1",
        "COMMIT",
    ], statements


@pytest.mark.postgres
@pytest.mark.parametrize("isolation", ["repeatable_read", "read_committed"])
def test_only_a_workers_transaction_takes_an_id_at_begin(pg_url, tmp_path, isolation):
    """The items reader and jobrunner's own sessions begin without an id, or
    a transaction left open (a generator items()) would hold back VACUUM
    with one. At read_committed they share the workers' level, so those runs
    keep psycopg2's transactions (and read the id just before COMMIT)."""
    from jobrunner import config as configmod
    from jobrunner import db as dbmod

    config = configmod.load({"database_url": pg_url, "isolation": isolation}, environ={}, cwd=tmp_path)
    database = dbmod.open_database(config, "job", workers=1)
    assigned = text("SELECT txid_current_if_assigned()")
    try:
        with database.reader() as reader, database.bookkeeping() as own, database.session() as worker:
            assert reader.scalar(assigned) is None
            assert own.scalar(assigned) is None
            took = worker.scalar(assigned) is not None
    finally:
        database.dispose()
    assert took == (isolation == "repeatable_read")
