"""The attempt decisions and the error classifier on their own: no database,
no waiting. Errors are the drivers' own exception classes, wrapped the way
SQLAlchemy wraps them, carrying the codes their servers send."""

from __future__ import annotations

import sqlite3

import psycopg2.errors
import pymysql
import pytest
from sqlalchemy import exc

from jobrunner import attempt
from jobrunner.attempt import Do, Policy, Tally, Verdict
from jobrunner.outage import Kind, classify, is_deadlock, timed_out_waiting

POLICY = Policy(retries=3)


def decide(kind: Kind, *, items: int = 1, committing: bool = False, tally: Tally | None = None, **stop):
    return attempt.after_error(
        kind,
        committing=committing,
        items=items,
        tally=tally or Tally(),
        policy=POLICY,
        stopping=stop.get("stopping", False),
        fatal_stop=stop.get("fatal_stop", False),
    )


# -- the fence -------------------------------------------------------------------------------
def test_a_lock_taken_again_redoes_the_chunk_and_a_lost_one_rolls_it_back():
    assert attempt.after_refusal(Verdict.REDO) is Do.REDO
    assert attempt.after_refusal(Verdict.ABANDON) is Do.ROLL_BACK
    with pytest.raises(ValueError):
        attempt.after_refusal(Verdict.COMMIT)


# -- errors ----------------------------------------------------------------------------------
def test_a_conflict_is_retried_until_the_retries_are_spent():
    assert decide(Kind.TRANSIENT, tally=Tally(retries=0)) is Do.RETRY
    assert decide(Kind.TRANSIENT, tally=Tally(retries=2)) is Do.RETRY
    assert decide(Kind.TRANSIENT, tally=Tally(retries=3)) is Do.FAIL
    assert decide(Kind.TRANSIENT, items=5, tally=Tally(retries=3)) is Do.ISOLATE


def test_a_conflict_is_not_retried_once_the_run_may_no_longer_commit():
    assert decide(Kind.TRANSIENT, fatal_stop=True) is Do.FAIL
    # An ordinary stop (a signal) lets items in flight finish, retries included.
    assert decide(Kind.TRANSIENT, stopping=True) is Do.RETRY


def test_the_items_own_error_fails_one_item_and_isolates_a_chunk():
    assert decide(Kind.FATAL) is Do.FAIL
    assert decide(Kind.FATAL, items=2) is Do.ISOLATE
    assert decide(Kind.FATAL, items=64, tally=Tally(retries=0)) is Do.ISOLATE


def test_the_database_gone_is_waited_for_without_spending_a_retry():
    assert decide(Kind.GONE, tally=Tally(retries=3)) is Do.WAIT
    assert decide(Kind.GONE, tally=Tally(redos=attempt.MAX_REDOS_AFTER_OUTAGE - 1)) is Do.WAIT


def test_a_database_that_keeps_vanishing_under_one_chunk_fails_it_in_the_end():
    spent = Tally(redos=attempt.MAX_REDOS_AFTER_OUTAGE)
    assert decide(Kind.GONE, tally=spent) is Do.FAIL
    assert decide(Kind.GONE, items=3, tally=spent) is Do.ISOLATE
    assert decide(Kind.GONE, tally=spent, stopping=True) is Do.ROLL_BACK


def test_a_commit_cut_by_a_lost_connection_is_settled_never_simply_redone():
    for tally in (Tally(), Tally(redos=99, retries=99)):
        assert decide(Kind.GONE, committing=True, tally=tally) is Do.SETTLE
        assert decide(Kind.GONE, committing=True, tally=tally, stopping=True) is Do.SETTLE


def test_after_an_outage_the_chunk_is_redone_or_the_run_is_ending():
    assert attempt.after_outage(back=True, gave_up=False, stopping=False, items=1) is Do.REDO
    assert attempt.after_outage(back=False, gave_up=True, stopping=False, items=1) is Do.ROLL_BACK
    assert attempt.after_outage(back=False, gave_up=False, stopping=True, items=1) is Do.ROLL_BACK
    assert attempt.after_outage(back=False, gave_up=False, stopping=False, items=1) is Do.FAIL
    assert attempt.after_outage(back=False, gave_up=False, stopping=False, items=4) is Do.ISOLATE


def test_a_cut_commit_nobody_can_look_up_fails_in_doubt():
    assert attempt.before_settle(can_look=False) is Do.FAIL
    assert attempt.before_settle(can_look=True) is Do.WAIT


def test_a_looked_up_commit_counts_once_is_redone_once_or_fails_in_doubt():
    assert attempt.after_settle(True) is Do.DONE
    assert attempt.after_settle(False) is Do.REDO
    assert attempt.after_settle(None) is Do.FAIL


@pytest.mark.parametrize("size", [2, 3, 64, 1000])
def test_a_failed_chunk_is_tried_again_in_parts_covering_every_item_once(size):
    parts = attempt.isolate(size)
    assert sum(parts) == size and all(part >= 1 for part in parts)


# -- the classifier, for every driver ----------------------------------------------------------
def _pg(cls: type, sqlstate: str | None, message: str = "error") -> BaseException:
    """A psycopg2 error as the server would send it (its code is set by libpq)."""
    error_class = type(cls.__name__, (cls,), {"pgcode": sqlstate})
    return error_class(message)


def wrapped(orig: BaseException, *, invalidated: bool = False) -> exc.DBAPIError:
    error = exc.OperationalError("SELECT 1", {}, orig)
    error.connection_invalidated = invalidated
    return error


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (wrapped(_pg(psycopg2.errors.SerializationFailure, "40001")), Kind.TRANSIENT),
        (wrapped(_pg(psycopg2.errors.DeadlockDetected, "40P01")), Kind.TRANSIENT),
        (wrapped(_pg(psycopg2.errors.LockNotAvailable, "55P03")), Kind.FATAL),
        (wrapped(_pg(psycopg2.errors.AdminShutdown, "57P01")), Kind.GONE),
        (wrapped(_pg(psycopg2.errors.CannotConnectNow, "57P03")), Kind.GONE),
        (wrapped(_pg(psycopg2.OperationalError, None, "connection refused\n\tIs the server")), Kind.GONE),
        (
            wrapped(_pg(psycopg2.OperationalError, None, "server closed the connection unexpectedly")),
            Kind.GONE,
        ),
        (wrapped(_pg(psycopg2.OperationalError, None, "anything"), invalidated=True), Kind.GONE),
        (wrapped(_pg(psycopg2.errors.UniqueViolation, "23505")), Kind.FATAL),
        (wrapped(pymysql.err.OperationalError(1213, "Deadlock found")), Kind.TRANSIENT),
        (wrapped(pymysql.err.OperationalError(1205, "Lock wait timeout exceeded")), Kind.TRANSIENT),
        (wrapped(pymysql.err.OperationalError(2013, "Lost connection to server")), Kind.GONE),
        (wrapped(pymysql.err.OperationalError(2003, "Can't connect")), Kind.GONE),
        (wrapped(pymysql.err.IntegrityError(1062, "Duplicate entry")), Kind.FATAL),
        (wrapped(sqlite3.OperationalError("database is locked")), Kind.TRANSIENT),
        (wrapped(sqlite3.OperationalError("no such table: t")), Kind.FATAL),
        (exc.TimeoutError("QueuePool limit of size 4 overflow 0 reached"), Kind.FATAL),
        (exc.PendingRollbackError("This Session's transaction has been rolled back"), Kind.FATAL),
        (ValueError("the job's own bug"), Kind.FATAL),
    ],
)
def test_every_databases_errors_are_classified_one_way(error, kind):
    assert classify(error) is kind


def test_an_error_raised_while_handling_a_conflict_is_classified_by_its_cause():
    try:
        try:
            raise wrapped(_pg(psycopg2.errors.SerializationFailure, "40001"))
        except exc.OperationalError as conflict:
            raise RuntimeError("the job wrapped it") from conflict
    except RuntimeError as error:
        assert classify(error) is Kind.TRANSIENT


@pytest.mark.parametrize(
    ("error", "deadlock"),
    [
        (wrapped(_pg(psycopg2.errors.DeadlockDetected, "40P01")), True),
        (wrapped(pymysql.err.OperationalError(1213, "Deadlock found")), True),
        (wrapped(_pg(psycopg2.errors.SerializationFailure, "40001")), False),
        (wrapped(pymysql.err.OperationalError(1205, "Lock wait timeout exceeded")), False),
        (wrapped(sqlite3.OperationalError("database is locked")), False),
        (ValueError("the job's own bug"), False),
    ],
)
def test_a_deadlock_is_told_apart_from_other_conflicts(error, deadlock):
    assert is_deadlock(error) is deadlock


# -- chunk sizes under conflict ----------------------------------------------------------------
def test_a_conflict_halves_the_chunk_size_down_to_one():
    size = attempt.ChunkSize(50)
    assert [size.conflict() for _ in range(7)] == [25, 12, 6, 3, 1, 1, 1]


def test_the_chunk_size_grows_back_after_clean_commits_never_past_the_ceiling():
    size = attempt.ChunkSize(50)
    size.conflict()
    size.conflict()  # 12, threshold 12
    grown = []
    for _ in range(8 * attempt.GROW_AFTER):
        size.committed(size.size)
        grown.append(size.size)
    assert grown[attempt.GROW_AFTER - 1] == 13, "past the threshold it grows one item at a time"
    assert max(grown) <= 50 and grown == sorted(grown)


def test_below_its_threshold_the_chunk_size_doubles_back():
    size = attempt.ChunkSize(64)
    for _ in range(6):
        size.conflict()  # 1, threshold 1
    size.threshold = 16  # as after a conflict at 32
    for _ in range(attempt.GROW_AFTER):
        size.committed(1)
    assert size.size == 2


def test_a_chunk_smaller_than_the_size_or_a_retried_one_does_not_grow_it():
    size = attempt.ChunkSize(50)
    size.conflict()
    for _ in range(10 * attempt.GROW_AFTER):
        size.committed(3)  # the feed had only 3 items ready: says nothing of 25
    assert size.size == 25


def test_a_size_that_keeps_conflicting_is_probed_ever_less_often():
    """On rows that only single items share without a deadlock, every probe
    at 2 costs a deadlock: each failed probe doubles the clean commits before
    the next, up to GROW_AFTER_MAX."""
    size = attempt.ChunkSize(100)
    for _ in range(7):
        size.conflict()  # 1
    waits = []
    for _ in range(12):
        commits = 0
        while size.size == 1:
            size.committed(1)
            commits += 1
        waits.append(commits)
        assert size.conflict() == 1  # the probe at 2 conflicts at once
    assert waits[:4] == [4, 8, 16, 32]
    assert waits[-1] == attempt.GROW_AFTER_MAX and max(waits) == attempt.GROW_AFTER_MAX


def test_a_probe_that_holds_brings_back_the_usual_pace():
    size = attempt.ChunkSize(100)
    for _ in range(7):
        size.conflict()
    for _ in range(3):  # three failed probes: 32 clean commits before the next
        while size.size == 1:
            size.committed(1)
        size.conflict()
    while size.size == 1:
        size.committed(1)
    assert size.size == 2 and size.grow_after == 32
    for _ in range(32):
        size.committed(2)  # the probe at 2 holds, and 2 grows to 3
    assert size.size == 3 and size.grow_after == attempt.GROW_AFTER
    size.committed(3)
    size.conflict()  # a conflict after a grown size held counts as a failed probe of 3 only
    assert size.size == 1 and size.grow_after == 2 * attempt.GROW_AFTER


def test_a_deadlock_sends_the_chunk_size_to_one_and_the_next_probe_far_off():
    size = attempt.ChunkSize(100)
    assert size.conflict(deadlock=True) == 1
    commits = 0
    while size.size == 1:
        size.committed(1)
        commits += 1
    assert commits == attempt.GROW_AFTER_DEADLOCK


def test_chunks_that_adapt_wait_for_locks_a_bounded_time_from_the_first_and_fixed_chunks_do_not():
    size = attempt.ChunkSize(8)
    assert size.bounded_wait, "from the first chunk: the first wave is where hot rows deadlock"
    size.conflict(deadlock=True)
    assert size.bounded_wait
    assert not attempt.ChunkSize(8, adapt=False).bounded_wait, "fixed chunks keep the server's"


def test_running_out_of_jobrunners_own_lock_timeout_is_a_conflict_and_the_jobs_own_is_not():
    timeout = wrapped(_pg(psycopg2.errors.LockNotAvailable, "55P03"))
    assert timed_out_waiting(timeout) and not is_deadlock(timeout)
    assert classify(timeout, bounded_wait=True) is Kind.TRANSIENT
    assert classify(timeout) is Kind.FATAL  # the job's NOWAIT, or a lock_timeout of its own
    assert not timed_out_waiting(wrapped(_pg(psycopg2.errors.DeadlockDetected, "40P01")))


def test_workers_sharing_a_pace_learn_from_each_others_failed_probes():
    pace = attempt.Pace()
    first, second = attempt.ChunkSize(8, pace=pace), attempt.ChunkSize(8, pace=pace)
    for size in (first, second):
        for _ in range(3):
            size.conflict()  # 1
    while first.size == 1:
        first.committed(1)
    first.conflict()  # first's probe at 2 failed
    commits = 0
    while second.size == 1:
        second.committed(1)
        commits += 1
    assert commits == 2 * attempt.GROW_AFTER


def test_a_fixed_chunk_size_stays_at_the_ceiling():
    size = attempt.ChunkSize(50, adapt=False)
    assert size.conflict() == 50
    size.committed(50)
    assert size.size == 50


def test_parts_cut_work_in_order_and_halves_cover_it():
    assert attempt.parts(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert attempt.halves(list(range(5))) == [[0, 1, 2], [3, 4]]
    assert attempt.halves([9]) == [[9]]


def test_a_part_whose_failing_item_is_known_is_split_around_it():
    part = list(range(10))
    assert attempt.split(part, 4) == [[0, 1, 2, 3], [4], [5, 6, 7, 8, 9]]
    assert attempt.split(part, 0) == [[0], list(range(1, 10))]
    assert attempt.split(part, 9) == [list(range(9)), [9]]
    assert attempt.split(part, None) == attempt.halves(part)
    assert attempt.split(part, 99) == attempt.halves(part), "a position outside the part says nothing"


def test_items_get_savepoints_of_their_own_while_bad_items_keep_coming():
    savepoints = attempt.ItemSavepoints()
    assert not savepoints.on  # a run starts without: they cost two statements per item
    savepoints.chunk(bad=False)
    assert not savepoints.on
    savepoints.chunk(bad=True)
    assert savepoints.on
    for _ in range(attempt.SAVEPOINTS_CLEAN_CHUNKS - 1):
        savepoints.chunk(bad=False)
        assert savepoints.on
    savepoints.chunk(bad=True)  # a bad item starts the count of clean chunks again
    for _ in range(attempt.SAVEPOINTS_CLEAN_CHUNKS - 1):
        savepoints.chunk(bad=False)
    assert savepoints.on
    savepoints.chunk(bad=False)
    assert not savepoints.on
