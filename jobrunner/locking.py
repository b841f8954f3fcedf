"""The right to commit: the singleton guard, its heartbeat, taking the lock
again after an outage, and the fence every commit asks.

A dedicated session (from the run's session factory, on an engine of its own)
holds a lock in an open transaction for the whole run. Nothing is leased or
expires: the lock ends with that transaction, at the end of the run, or when
the database sees the process die.

What each database holds (its SQL is in ``lockstore.py``):

- PostgreSQL, ``lock = "row"`` (default): the job's row of ``jobrunner_locks``
  locked ``FOR UPDATE SKIP LOCKED``. The row is inserted first in a
  transaction of its own (a lock on a missing row excludes no one), so "no
  row returned" can only mean "someone holds it". SKIP LOCKED rather than
  NOWAIT: a held lock is an answer, not an error in the server's log.
- PostgreSQL, ``lock = "advisory"``: ``pg_try_advisory_xact_lock`` in the same
  kind of open transaction. Same exclusion and crash release, but the
  transaction takes no xid, so it does not hold back VACUUM on a long run.
- SQLite: ``with_for_update()`` compiles to a plain SELECT there, and an open
  write transaction on the main database would block every worker. So the
  guard holds ``BEGIN IMMEDIATE`` on a small lock database beside the main
  file (``<db>.<job>.lock``), opened with no busy timeout.

The guard's transaction runs at READ COMMITTED whatever the server's
default, so it never holds a snapshot or takes part in serialization.

One thread owns the guard session from acquisition to release and heartbeats
it; no other thread touches it. A failed heartbeat, or a changed backend pid
(a session that silently reconnected no longer holds the lock), puts the lock
in doubt: no commit may happen from then on. The guard then tries, within the
outage bound, to take the lock again on a new connection; it keeps it only if
no other run of the job started meanwhile (the run's history says), and
every transaction begun before the retake is redone. Otherwise the lock is
lost and the run stops (exit 69).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from sqlalchemy import exc, func, select, text

from jobrunner import db as dbmod
from jobrunner import tables
from jobrunner.attempt import Verdict
from jobrunner.exceptions import DatabaseUnavailable, JobrunnerError, LockHeld, RunOver
from jobrunner.lockstore import LockStore, backend_identity, helpers_key, lock_store
from jobrunner.outage import Kind, classify
from jobrunner.result import Status
from jobrunner.stop import Stop

log = logging.getLogger("jobrunner")

POLL_INTERVAL_S = 0.1
LEADER_GRACE_BEATS = 5
HOLDER_WAIT_S = 3.0
FORGET_HOLDER_WAIT_S = 0.5
RETAKE_BACKOFF_CAP_S = 2.0


class _Heartbeat:
    """A right to commit, held by a session that one thread owns and beats.

    The owner thread takes the right (``_take``), checks it every heartbeat
    (``_beat``), and when a check fails puts it in doubt and tries to take it
    again for up to ``retake_within`` seconds. Workers ask :meth:`verdict`
    before every commit. Subclasses: :class:`Guard` (the job's lock) and
    :class:`HelperFence` (a helper's right to work for a distributed run).
    """

    what = "lock"
    connection = "lock's database connection"

    def __init__(
        self,
        database: dbmod.Database,
        job: str,
        *,
        heartbeat: float,
        on_lost: Callable[[str], object] | None,
        may_retake: Callable[[], bool] | None,
        retake_within: float,
        notice: Callable[[str], None] | None,
    ) -> None:
        self.database = database
        self.job = job
        self.heartbeat = heartbeat
        self.on_lost = on_lost
        self.may_retake = may_retake
        self.retake_within = retake_within
        self.notice = notice or (lambda _text: None)
        self.lost = threading.Event()
        self.lost_reason: str | None = None
        self.retakes = 0
        # How long a NotYet (see HelperFence) is waited for; the database's own
        # absence is waited for the whole outage bound.
        self.not_yet_within = retake_within
        self._in_doubt = False
        self._beat_at = 0.0
        self._cond = threading.Condition()
        self._acquired = threading.Event()
        self._release = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @functools.cached_property
    def store(self) -> LockStore:
        """The lock's SQL for this database."""
        return lock_store(self.database)

    # -- the owner thread's side -------------------------------------------
    def __enter__(self) -> Any:
        self._thread = threading.Thread(target=self._own, name=f"jobrunner-guard-{self.job}", daemon=True)
        self._thread.start()
        self._acquired.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def release(self, timeout: float = 10.0) -> None:
        self._release.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def check(self) -> bool:
        """True while the right is held (and not in doubt)."""
        return not self.lost.is_set() and not self._in_doubt

    def settle(self, timeout: float) -> bool:
        """Wait while the right is in doubt, up to ``timeout``: True if it is held."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._in_doubt and not self.lost.is_set() and not self._release.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.1))
        return self.check()

    # -- the fence: asked by every worker before each commit -----------------
    def epoch(self) -> int:
        return self.retakes

    def verdict(self, epoch: int, *, wait: bool = True) -> Verdict | None:
        """COMMIT while the right is held and was last confirmed recently;
        REDO if it was taken again since ``epoch``; ABANDON once it is lost.
        ``wait=False``: None where the answer needs waiting for.

        "Recently": within two heartbeats. A process that was frozen (SIGSTOP,
        a paused VM) may have lost its lock while it slept; its workers wait
        here for a fresh heartbeat rather than commit on stale knowledge.
        """
        stale_after = 2 * self.heartbeat + 0.5
        # The common case, without the lock (workers ask before every commit):
        # each attribute is read atomically, and a stale read only sends us
        # the careful way below.
        if not self.lost.is_set() and not self._in_doubt and time.monotonic() - self._beat_at <= stale_after:
            return Verdict.REDO if epoch != self.retakes else Verdict.COMMIT
        if not wait:
            return Verdict.ABANDON if self.lost.is_set() else None
        with self._cond:
            while True:
                if self.lost.is_set():
                    return Verdict.ABANDON
                fresh = time.monotonic() - self._beat_at <= stale_after
                if not self._in_doubt and fresh:
                    return Verdict.REDO if epoch != self.retakes else Verdict.COMMIT
                if self._release.is_set():
                    return Verdict.ABANDON
                self._cond.wait(0.1)

    # -- the owner thread ---------------------------------------------------
    def _own(self) -> None:
        asked = time.monotonic()
        try:
            session, backend = self._take(initial=True)
        except BaseException as error:  # noqa: BLE001 - handed to the owner thread
            self._error = _as_jobrunner_error(error, self.database.url)
            self._acquired.set()
            return
        self._beaten(asked)
        self._acquired.set()
        try:
            while not self._release.wait(self.heartbeat):
                # The answer is as old as the question: a process frozen after
                # the reply came (SIGSTOP, a paused VM) must not stamp it fresh
                # when it wakes, or its workers commit for a beat on a lock that
                # another run has taken meanwhile.
                asked = time.monotonic()
                try:
                    reason = self._beat(session, backend)
                except RunOver as over:
                    self._mark_lost(str(over))
                    return
                if reason is None:
                    self._beaten(asked)
                    continue
                _close_quietly(session)
                session, backend = None, None
                session, backend = self._retake(reason)
                if session is None:
                    return
            try:
                self._let_go(session)
                session.rollback()  # ends the transaction: the lock is released
            except exc.DBAPIError:
                pass
        except Exception as error:
            # Whatever this thread did not foresee, the run must not wait for a
            # lock that nobody is looking after any more: it is lost, and the
            # run ends by that road.
            log.debug("the lock's thread failed", exc_info=True)
            self._mark_lost(f"the lock's thread failed: {dbmod.describe_error(error)}")
        finally:
            if session is not None:
                _close_quietly(session)

    def _take(self, *, initial: bool) -> tuple[Any, Any]:
        """A new session holding the right, and its backend id; raises
        :class:`LockHeld` (or :class:`RunOver`) if it cannot be had."""
        raise NotImplementedError

    def _let_go(self, session: Any) -> None:
        """Anything the end of the transaction does not release by itself."""

    def _beat(self, session: Any, backend: Any) -> str | None:
        """None while the right holds, else why not."""
        try:
            current = session.scalar(text("SELECT 1") if backend is None else self.store.backend_query())
        except Exception as error:  # noqa: BLE001 - any failure means the lock is gone
            return f"the {self.connection} failed: {dbmod.describe_error(error)}"
        if backend is not None and current != backend:
            return f"the {self.connection} was replaced"
        return None

    def _retake(self, reason: str) -> tuple[Any, Any]:
        """After a failed heartbeat: take the right again, or declare it lost."""
        with self._cond:
            self._in_doubt = True
        if self.may_retake is None:
            self._mark_lost(reason)
            return None, None
        self.notice(f"{self.what} in doubt ({reason}): nothing commits until it is taken again")
        deadline = time.monotonic() + self.retake_within
        not_yet_deadline = time.monotonic() + self.not_yet_within
        delay = POLL_INTERVAL_S
        while not self._release.is_set():
            asked = time.monotonic()
            try:
                session, backend = self._take(initial=False)
            except (LockHeld, RunOver) as held:
                self._mark_lost(f"{reason}; meanwhile {held}")
                return None, None
            except (exc.DBAPIError, NotYet) as error:
                gone = isinstance(error, NotYet) or classify(error) is Kind.GONE
                until = not_yet_deadline if isinstance(error, NotYet) else deadline
                if gone and time.monotonic() < until:
                    self._release.wait(delay)
                    delay = min(RETAKE_BACKOFF_CAP_S, delay * 2)
                    continue
                detail = dbmod.describe_error(error)
                # The reason once: a leader that never came back says so in both.
                again = (
                    "it did not come back in time"
                    if detail in reason
                    else f"it could not be taken again: {detail}"
                )
                self._mark_lost(f"{reason}; {again}")
                return None, None
            if not self._still_ours():
                _close_quietly(session)
                self._mark_lost(f"{reason}; another run of {self.job} started while it was lost")
                return None, None
            with self._cond:
                self.retakes += 1
                self._in_doubt = False
                self._beat_at = asked
                self._cond.notify_all()
            self.notice(f"{self.what} taken again: work that was in flight is redone")
            return session, backend
        self._mark_lost(reason)
        return None, None

    def _still_ours(self) -> bool:
        try:
            return bool(self.may_retake and self.may_retake())
        except Exception:  # noqa: BLE001 - cannot tell: then it is not ours
            return False

    def _beaten(self, asked: float) -> None:
        """The right was confirmed by a question sent at ``asked``."""
        with self._cond:
            self._beat_at = asked
            self._cond.notify_all()

    def _mark_lost(self, reason: str) -> None:
        self.lost_reason = reason
        with self._cond:
            self.lost.set()
            self._cond.notify_all()
        if self.on_lost is not None:
            self.on_lost(reason)


class NotYet(Exception):
    """The right cannot be had yet, but may be soon (a leader taking its lock again)."""


class Guard(_Heartbeat):
    """Hold the job's lock for the ``with`` block; raise :class:`LockHeld` if taken.

    ``lost`` becomes set, and ``on_lost(reason)`` is called, once the lock is
    lost for good. ``may_retake()``, when given, is asked after the lock was
    taken again following a failed heartbeat: False means another run may
    have worked meanwhile, and the lock counts as lost. ``backend`` is the
    lock connection's identity (``pid@backend_start`` on PostgreSQL), for the
    helpers of a distributed run; ``on_retake`` hears of a new one.
    """

    def __init__(
        self,
        database: dbmod.Database,
        job: str,
        *,
        mode: str = "row",
        wait: float = 0.0,
        heartbeat: float = 1.0,
        on_lost: Callable[[str], object] | None = None,
        record_holder: bool = True,
        may_retake: Callable[[], bool] | None = None,
        retake_within: float = 0.0,
        notice: Callable[[str], None] | None = None,
        on_retake: Callable[[str | None], None] | None = None,
    ) -> None:
        super().__init__(
            database,
            job,
            heartbeat=heartbeat,
            on_lost=on_lost,
            may_retake=may_retake,
            retake_within=retake_within,
            notice=notice,
        )
        self.mode = self.store.mode(mode)
        self.wait = wait
        self.record_holder = record_holder
        self.on_retake = on_retake
        self.backend: str | None = None
        self._since: datetime | None = None

    def _take(self, *, initial: bool) -> tuple[Any, Any]:
        session = self.database.guard_session(self.job)
        try:
            wait = self.wait if initial else 0.0
            deadline = time.monotonic() + wait
            if self.mode == "row":
                self.store.ensure_row(session, self.job)
            while not self.store.try_lock(session, self.job, self.mode):
                session.rollback()
                if time.monotonic() >= deadline:
                    raise LockHeld(self.job, self._holder())
                time.sleep(min(POLL_INTERVAL_S, max(0.0, deadline - time.monotonic())))
            pid, self.backend = self.store.backend(session, self.mode)
            if self.record_holder:
                self._write_holder()
            if not initial and self.on_retake is not None and self._still_ours():
                self.on_retake(self.backend)
            return session, pid
        except BaseException:
            _close_quietly(session)
            raise

    def _let_go(self, session: Any) -> None:
        if self._since is not None:  # this run wrote a holder row (record_holder)
            self._forget_holder()
        self.store.let_go(session, self.job, self.mode)

    def _forget_holder(self) -> None:
        # While the lock is still held: a loser that finds no row knows the
        # winner has yet to write its own and waits for it (_holder), where a
        # row left behind would name a run that has ended. Only a run that
        # died keeps its row, until the next one writes over it.
        try:
            # Impatient: on SQLite, items abandoned at --shutdown-timeout may
            # hold the write lock until the process leaves (a 30 s wait, seen).
            with self.database.impatient_session(FORGET_HOLDER_WAIT_S) as session, session.begin():
                self.store.forget_holder(session, self.job)
        except exc.DBAPIError as error:
            log.info("cannot clear the lock's holder: %s", dbmod.describe_error(error))

    def _holder(self) -> dict[str, Any]:
        """Who holds the lock. A winner writes its row just after it takes the
        lock: a loser that lost the race by a moment waits briefly for it
        rather than say nothing of the holder."""
        deadline = time.monotonic() + HOLDER_WAIT_S
        while not (holder := read_holder(self.database, self.job)) and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL_S)
        return holder

    def _write_holder(self) -> None:
        # "since" is when this run took the lock first: a retake after a lost
        # connection is the same run, and status must not say it began then.
        if self._since is None:
            self._since = datetime.now(UTC).replace(tzinfo=None)
        with self.database.bookkeeping() as session, session.begin():
            self.store.write_holder(session, self.job, self._since)


def helpers_still_working(database: dbmod.Database, job: str) -> bool:
    """True while a helper of some run of ``job`` can still commit: it holds the
    helpers' key shared, so an exclusive try fails (and is let go at once)."""
    with database.bookkeeping() as session:
        free = session.scalar(select(func.pg_try_advisory_xact_lock(helpers_key(job))))
        session.rollback()
    return not free


class HelperFence(_Heartbeat):
    """A helper's right to commit for a distributed run.

    Held while: the helper's own connection holds the job's helpers key,
    shared (so that no new run of the job starts while it can commit); the
    run is still running; and the leader's lock connection, named in the
    run's row, is alive. When the leader dies or loses its lock, its lock
    connection goes, and every helper stops committing within a heartbeat;
    if the leader takes its lock again (a new connection, written in the row)
    within a few heartbeats, the helpers carry on and redo what was in flight;
    otherwise they leave with exit 69.
    """

    what = "helper's right to commit"
    connection = "helper's database connection"

    def __init__(self, database: dbmod.Database, job: str, run_id: int, **kwargs: Any) -> None:
        super().__init__(database, job, **kwargs)
        self.run_id = run_id
        self.stop_requested: str | None = None
        # The run's status once it is no longer running (None: no row).
        self.ended_as: str | None = None
        # With the database up, a leader that lost only its connection has its
        # lock again within a heartbeat or two; one that died never will. A
        # helper that leaves too early costs throughput, never correctness.
        self.not_yet_within = min(self.retake_within, LEADER_GRACE_BEATS * self.heartbeat + 2.0)

    def _take(self, *, initial: bool) -> tuple[Any, Any]:
        session = self.database.guard_session(self.job, role="helper")
        try:
            session.execute(select(func.pg_advisory_xact_lock_shared(helpers_key(self.job))))
            pid, _ = backend_identity(session)
            # A leader that has just started names its lock connection a moment
            # after its run's row appears: wait for it, as after a retake.
            deadline = time.monotonic() + (self.not_yet_within if initial else 0)
            while True:
                try:
                    self._run_state(session)
                    return session, pid
                except NotYet:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(POLL_INTERVAL_S)
        except BaseException:
            _close_quietly(session)
            raise

    def _beat(self, session: Any, backend: Any) -> str | None:
        reason = super()._beat(session, backend)
        if reason is not None:
            return reason
        try:
            return self._run_state(session)
        except NotYet as away:
            return str(away)
        except RunOver:
            raise
        except Exception as error:  # noqa: BLE001 - the connection failed mid-check
            return f"the helper's database connection failed: {dbmod.describe_error(error)}"

    def _run_state(self, session: Any) -> str | None:
        """None if the run goes on with its leader alive; raises NotYet while the
        leader's lock connection is gone, RunOver once the run has ended."""
        runs = tables.runs
        columns = (runs.c.status, runs.c.leader_backend, runs.c.stop_requested)
        row = session.execute(select(*columns).where(runs.c.id == self.run_id)).first()
        if row is None or row.status != Status.RUNNING.value:
            self.ended_as = None if row is None else row.status
            raise RunOver(f"run {self.run_id} of {self.job} has ended")
        self.stop_requested = row.stop_requested
        # pg_stat_activity is a snapshot per transaction, and this one lasts the whole run.
        session.execute(text("SELECT pg_stat_clear_snapshot()"))
        pid, _, started = (row.leader_backend or "0@").partition("@")
        alive = session.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE pid = :pid AND backend_start = CAST(:start AS timestamptz)"
            ),
            {"pid": int(pid), "start": started or None},
        )
        if not alive:
            raise NotYet(f"the leader of run {self.run_id} has no lock connection")
        return None

    @property
    def finished_by_leader(self) -> bool:
        """The leader ended the run itself, once the work table was empty: a
        helper has nothing in flight then (a claimed row stays visible, and
        keeps the leader waiting, until its chunk commits)."""
        return self.ended_as in (Status.SUCCEEDED.value, Status.FAILED.value)


class RunFence:
    """What a worker asks before each commit: the guard (if any), plus the
    run's own reasons to commit nothing more (a lost lock, an outage past its
    bound, workers abandoned after the shutdown timeout)."""

    def __init__(self, guard: _Heartbeat | None, stop: Stop) -> None:
        self.guard = guard
        self.stop = stop
        self.closed = threading.Event()

    def epoch(self) -> int:
        return self.guard.epoch() if self.guard is not None else 0

    def verdict(self, epoch: int, *, wait: bool = True) -> Verdict | None:
        """The guard's verdict (see :meth:`_Heartbeat.verdict`), or ABANDON."""
        if self.closed.is_set() or self.stop.fatal:
            return Verdict.ABANDON
        verdict = self.guard.verdict(epoch, wait=wait) if self.guard is not None else Verdict.COMMIT
        if verdict is None:
            return None
        if self.closed.is_set():
            return Verdict.ABANDON
        return verdict


# Backends of this job's runs with a write transaction open (an xid), other
# than the asking one. Holding the lock, such a transaction is an earlier
# holder's: the lock's own connection is named "... lock", a --no-lock run's
# "... no-lock", and this run has started no worker yet.
EARLIER_WRITERS = text(
    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = :name "
    "AND pid <> pg_backend_pid() AND backend_xid IS NOT NULL"
)
GONE_WAIT_S = 5.0


def end_earlier_writers(database: dbmod.Database, job: str, notice: Callable[[str], None]) -> int:
    """Just after taking the job's lock on PostgreSQL: end the write
    transactions an earlier holder left open, before this run reads what
    was committed.

    A holder whose lock was lost while it was frozen (SIGSTOP, a paused VM)
    may have been told "commit" just before, and send its COMMIT when it
    wakes, after this run has done the same item: the fence cannot see a
    freeze between its answer and the COMMIT; the database can end the
    transaction first. A COMMIT on an ended connection fails, the earlier
    run settles it as not committed, and its fence says it has lost the lock.
    Returns how many were ended; one that cannot be (another role's, without
    the privilege) is said, and left."""
    name = dbmod.connection_name(job)[: dbmod.APP_NAME_MAX]
    ended: list[int] = []
    with database.bookkeeping() as session:
        pids = list(session.execute(EARLIER_WRITERS, {"name": name}).scalars())
        session.rollback()
        for pid in pids:
            try:
                if session.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}):
                    ended.append(pid)
                session.rollback()
            except exc.DBAPIError as error:
                session.rollback()
                notice(
                    f"an earlier run of {job} still has a transaction open (backend {pid}) that this "
                    f"run cannot end ({dbmod.describe_error(error)}): if that run wakes, it may commit"
                )
        deadline = time.monotonic() + GONE_WAIT_S
        while ended and time.monotonic() < deadline:
            alive = session.scalar(
                text("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:pids)"), {"pids": ended}
            )
            session.rollback()
            if not alive:
                break
            time.sleep(POLL_INTERVAL_S)
    if ended:
        notice(
            f"ended {len(ended)} transaction(s) that an earlier run of {job} had left open: they are "
            "rolled back, and their items are this run's to do"
        )
    return len(ended)


def read_holder(database: dbmod.Database, job: str) -> dict[str, Any]:
    """Who last took the job's lock: host, pid, since (local time)."""
    try:
        with database.reader() as session:
            row = lock_store(database).read_holder(session, job)
    except exc.DBAPIError:
        return {}
    if row is None:
        return {}
    return {
        "host": row["host"],
        "pid": row["pid"],
        "since": row["since"].replace(tzinfo=UTC).astimezone(),
    }


def probe(database: dbmod.Database, job: str, mode: str = "row") -> dict[str, Any] | None:
    """The holder if a run holds the job's lock now, else None. Writes nothing:
    a missing lock row (or lock file) means no run has ever held it."""
    store = lock_store(database)
    found = store.probe_mode(job, store.mode(mode))
    if found is None:
        return None
    mode = found
    session = database.guard_session(job)
    try:
        if mode == "row":
            exists = store.has_row(session, job)
            session.rollback()
            if not exists:
                return None
        held = not store.try_lock(session, job, mode)
        if not held:
            store.let_go(session, job, mode)
        session.rollback()
    except exc.DBAPIError as error:
        raise DatabaseUnavailable(f"cannot read the job's lock: {dbmod.describe_error(error)}") from None
    finally:
        _close_quietly(session)
    if not held:
        return None
    return read_holder(database, job) or {"pid": None}


def _as_jobrunner_error(error: BaseException, url: str) -> BaseException:
    if isinstance(error, JobrunnerError):
        return error
    if isinstance(error, NotYet):
        return RunOver(str(error))
    if isinstance(error, exc.DBAPIError):
        return dbmod.refused_or_unavailable("cannot take the job's lock", error, url)
    return error


def _close_quietly(session: Any) -> None:
    try:
        session.close()
    except Exception:  # noqa: BLE001 - the connection may already be gone
        pass
