"""One unit of work in a worker thread: a chunk of 1..N items in one transaction.

For each chunk: ``prepare()`` each item (outside any transaction), claim the
chunk again if the feed needs it, ``process`` each item (or
``process_batch`` once), record the resume keys, ask the fence whether the
run may still commit, and commit, all on the worker's own session.

What to do when an attempt does not commit (retry after a backoff, wait out
an outage and redo, settle a commit cut by a lost connection, isolate the
bad items of a failed chunk, fail, roll back) is decided in ``attempt.py``;
this module carries the decisions out: the sleeping, the waiting, the
lookups and the counting.

A dry run uses the same unit on a savepoint session: "commit" releases the
chunk's savepoint, and the whole run's transaction is rolled back at the end.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy import text
from sqlalchemy.orm import Session

from jobrunner import attempt
from jobrunner.attempt import ChunkSize, Do, Verdict
from jobrunner.counters import Counters
from jobrunner.db import (
    BEGAN_INFO,
    JOB_CODE,
    PSYCOPG2_IDLE,
    UNDONE_BY_JOB,
    XID_INFO,
    begin_with,
    transaction_connection,
    work_lost,
)
from jobrunner.exceptions import CommitInDoubt, ItemRolledBack, error_line
from jobrunner.executor import in_this_thread
from jobrunner.feed import Entry, Feed
from jobrunner.outage import Kind, Outage, backoff, classify, is_deadlock, timed_out_waiting
from jobrunner.result import safe_repr
from jobrunner.stop import Stop

log = logging.getLogger("jobrunner")
SLOW_SQLITE_HOLD_S = 0.1
# SET LOCAL, unless the session's own lock_timeout is shorter already.
BOUND_LOCK_WAIT = (
    f"SELECT set_config('lock_timeout', '{attempt.BOUNDED_LOCK_WAIT_MS}ms', true) "
    "WHERE current_setting('lock_timeout') = '0' "
    f"OR current_setting('lock_timeout')::interval > interval '{attempt.BOUNDED_LOCK_WAIT_MS} ms'"
)
BOUNDED_WAIT = "jobrunner_bounded_wait"  # session.info: this transaction runs under BOUND_LOCK_WAIT


class Fence(Protocol):
    """The right to commit, asked before every commit (see ``locking.py``)."""

    def epoch(self) -> int: ...
    def verdict(self, epoch: int, *, wait: bool = True) -> Verdict | None: ...


class Keys(Protocol):
    """Resume keys, written in the chunk's own transaction (see ``history.py``)."""

    def record(self, session: Session, items: list[Any]) -> None: ...
    def committed(self, session: Session, item: Any) -> bool: ...


WORK_LOST = (
    "a statement of the item failed and the job caught the error without raising it, but the "
    "database had already given up the item's transaction, so its work cannot commit whole: the "
    "item fails (let the error propagate, or put a statement that may fail in "
    "session.begin_nested())"
)


_NO_SCOPE = contextlib.nullcontext()  # stateless, so one serves every worker


class TxidCheck:
    """PostgreSQL can say afterwards whether a transaction committed: its id,
    and ``txid_status`` once the database is back. So a commit cut by a restart
    is settled for any job, not only for jobs with ``item_key``.

    On psycopg2 the id came with BEGIN (``db.own_transactions``), at no round
    trip of its own; other drivers (asyncpg) read it just before COMMIT."""

    IN_PROGRESS_WAIT_S = 0.2
    IN_PROGRESS_TRIES = 25  # the old backend may still be finishing its COMMIT

    def mark(self, session: Session, connection: Any = None) -> Any:
        """The transaction's id, or None if it sent nothing or wrote nothing.
        ``connection``: the transaction's, if the caller has looked it up."""
        if connection is None:
            connection = transaction_connection(session)
            if connection is None:
                return None
        if XID_INFO in connection.info:
            return connection.info[XID_INFO]
        status = getattr(connection.dbapi_connection, "get_transaction_status", None)  # psycopg2's
        if status is not None and status() == PSYCOPG2_IDLE:
            return None  # psycopg2 is idle: nothing was sent, so nothing to settle
        # Through SQLAlchemy's connection (a lost connection is recognised as
        # one), without compiling a statement.
        return session.connection().exec_driver_sql("SELECT txid_current_if_assigned()").scalar()

    def committed(self, session: Session, mark: Any) -> bool | None:
        """True or False; None if the server cannot say (the id is too old)."""
        if mark is None:
            return True  # it wrote nothing: there is nothing to redo
        for _ in range(self.IN_PROGRESS_TRIES):
            status = session.scalar(text("SELECT txid_status(:xid)"), {"xid": mark})
            session.rollback()
            if status != "in progress":
                return {"committed": True, "aborted": False}.get(status)
            time.sleep(self.IN_PROGRESS_WAIT_S)
        return None


class Unit:
    """Runs chunks for the workers (one instance, shared: it keeps no per-chunk state)."""

    def __init__(
        self,
        *,
        job: Any,
        ctx: Any,
        feed: Feed,
        fence: Fence,
        outage: Outage,
        stop: Stop,
        progress: Counters,
        retries: int,
        keys: Keys | None,
        on_failure: Callable[[Any, Any, BaseException, bool], None],
        changes: Any = None,
        watch_sqlite_lock: Callable[[float, int], bool] | None = None,
        before_commit: Callable[[Session], None] | None = None,
        commit_check: TxidCheck | None = None,
        batch_size: int = 1,
        adapt: bool = True,
        in_hook: Callable[[Session], contextlib.AbstractContextManager[Any]] | None = None,
        blocking: Callable[..., Any] | None = None,
        one_chunk_size: bool = False,
        bounded_waits: bool = False,
    ) -> None:
        self.job = job
        self.ctx = ctx
        self.feed = feed
        self.fence = fence
        self.outage = outage
        self.stop = stop
        self.progress = progress
        self.policy = attempt.Policy(retries=retries)
        self.keys = keys
        self.on_failure = on_failure
        self.changes = changes  # a dry run's ChangeCounter
        self.watch_sqlite_lock = watch_sqlite_lock
        self.before_commit = before_commit  # bookkeeping that rides along (SQLite checkpoints)
        self.batched = job.process_batch is not None
        self.batch_size, self.adapt = batch_size, adapt
        self.bounded_waits = bounded_waits  # PostgreSQL's lock_timeout (see ChunkSize.bounded_wait)
        self.in_hook = in_hook  # the job's SCOPED_SESSION, bound to the session (see appcode.py)
        self._sizes = threading.local()  # each worker thread's ChunkSize
        self._pace = attempt.Pace()  # shared by them
        self._savepoints = attempt.ItemSavepoints()  # shared too
        # An async run's tasks share one thread, and so one ChunkSize.
        self._one_size = ChunkSize(batch_size, adapt=adapt, pace=self._pace) if one_chunk_size else None
        # How to wait (a backoff, an outage, a fence in doubt): in this thread,
        # or, on an event loop, in a thread of its own while the loop runs on.
        self.blocking: Callable[..., Any] = blocking or in_this_thread
        # Resume keys settle a commit in doubt already; else the database may.
        self.commit_check = commit_check if keys is None else None

    def __call__(self, session: Session, chunk: list[Entry]) -> None:
        self.transact(session, chunk, self.prepare(chunk))

    def prepare(self, chunk: list[Entry]) -> list[tuple[Any, Any, Any]]:
        """The chunk is in flight from here: each item's ``prepare``, outside
        any transaction (an async run does this before it takes a connection)."""
        self.progress.started_items(len(chunk))
        try:
            return self._prepare(chunk)
        except BaseException:
            self.progress.settled(len(chunk))
            raise

    def transact(self, session: Session, chunk: list[Entry], work: list[tuple[Any, Any, Any]]) -> None:
        """The prepared items of ``chunk`` in their transaction(s), to the end."""
        try:
            if work:
                self._finish(session, work, claimed=True)
        finally:
            self.progress.settled(len(chunk))

    def chunk_size(self) -> ChunkSize:
        """The calling worker thread's chunk size (what it takes next)."""
        if self._one_size is not None:
            return self._one_size
        size = getattr(self._sizes, "size", None)
        if size is None:
            size = self._sizes.size = ChunkSize(self.batch_size, adapt=self.adapt, pace=self._pace)
        return size

    def _finish(self, session: Session, work: list, *, claimed: bool) -> None:
        error = self._transact(session, work, claimed=claimed)
        if error is None:
            return
        work, unprepared = _split_unprepared(work)
        if unprepared:
            # Rolled back with the chunk, which freed their rows: settled on their own.
            for (item, token, _), prepare_error in unprepared:
                self.on_failure(item, token, prepare_error, False)
            if not work:
                return
        if len(work) == 1:
            self.on_failure(work[0][0], work[0][1], error, False)
            return
        self.progress.replay(len(work))
        log.info("a chunk of %d items failed (%s): replaying them one at a time", len(work), error)
        start = 0
        for size in attempt.isolate(len(work)):
            part, start = work[start : start + size], start + size
            failed = self._transact(session, part, claimed=False)
            if failed is not None:
                for item, token, _ in part:
                    self.on_failure(item, token, failed, False)

    def _prepare(self, chunk: list[Entry]) -> list[tuple[Any, Any, Any]]:
        """(item, token, value): ``value`` is what ``process`` gets."""
        prepare = self.job.prepare
        if prepare is None:
            return [(item, token, item) for item, token in chunk]
        work = []
        for item, token in chunk:
            try:
                work.append((item, token, prepare(self.ctx, item)))
            except Exception as error:  # noqa: BLE001 - the job's own code
                if self.feed.claims_in_transaction:
                    # The chunk's open transaction holds this item's claim: a
                    # failure settled apart would find the row held (by that
                    # very transaction), leave it, and the chunk's commit would
                    # then delete it as done. It fails in that transaction.
                    work.append((item, token, Unprepared(error)))
                else:
                    self.on_failure(item, token, error, False)
        return work

    def _transact(self, session: Session, work: list, *, claimed: bool) -> BaseException | None:
        """Commit ``work`` in one transaction. None when settled (committed,
        claimed by someone else, or rolled back because the run stopped);
        otherwise the error that failed it (the caller fails or isolates)."""
        tally = attempt.Tally()
        while True:
            epoch = self.fence.epoch()
            committing = bounded = False
            mark = None
            error: BaseException | None = None
            good, failed = work, []
            session.info.pop(BOUNDED_WAIT, None)
            try:
                if not claimed:
                    work = self._reclaim(session, work)
                    if not work:
                        session.rollback()
                        return None
                claimed = False
                if self.changes is not None:
                    self.changes.start(session)
                if self.bounded_waits and len(work) > 1 and self.chunk_size().bounded_wait:
                    begin_with(session, BOUND_LOCK_WAIT)  # in BEGIN's message where it can
                    bounded = session.info[BOUNDED_WAIT] = True
                todo, unprepared = _split_unprepared(work)
                failed = (self._process(session, todo) if todo else []) + unprepared
                connection = transaction_connection(session)
                if work_lost(connection):
                    raise ItemRolledBack(WORK_LOST)
                good = [w for w in todo if not any(w is f for f, _ in failed)] if failed else todo
                if failed:
                    self.feed.record_failures(session, [_failure(w, e) for w, e in failed], whole=not good)
                if self.keys is not None and good:
                    self.keys.record(session, [item for item, _, _ in good])
                if self.commit_check is not None:
                    # Before the verdict: nothing but COMMIT may come between the two.
                    # Recording failures may have begun the transaction since.
                    mark = self.commit_check.mark(session, connection)
                verdict = self.fence.verdict(epoch, wait=False) or self.blocking(self.fence.verdict, epoch)
                if verdict is Verdict.COMMIT:
                    committing = True
                    self._commit(session, len(good), chunk=len(work))
                    self._failed_alone(failed)
                    if tally.retries == 0:
                        self.chunk_size().committed(len(work))
                    return None
                session.rollback()
                self._discard()
                do = attempt.after_refusal(verdict)
            except Exception as raised:  # noqa: BLE001 - the job's code and the database's
                _rollback(session)
                self._discard()
                error = raised
                do = attempt.after_error(
                    classify(raised, bounded_wait=bounded),
                    committing=committing,
                    items=len(work),
                    tally=tally,
                    policy=self.policy,
                    stopping=self.stop.is_set() or self.outage.gave_up,
                    fatal_stop=self.stop.fatal,
                )
            if do is Do.WAIT:
                do = attempt.after_outage(
                    back=self.blocking(self.outage.wait, error),
                    gave_up=self.outage.gave_up,
                    stopping=self.stop.is_set(),
                    items=len(work),
                )
                if do is Do.REDO:
                    tally.redos += 1
                    self.progress.retry(len(work))
            if do is Do.REDO:
                continue
            if do is Do.RETRY:
                tally.retries += 1
                self.progress.retry(len(work))
                log.info("retrying %d item(s) after %s", len(work), error_line(error) if error else "?")
                # Running out of the bounded wait stands for the deadlock it spared.
                deadlock = error is not None and (
                    is_deadlock(error) or (bounded and timed_out_waiting(error))
                )
                size = self.chunk_size().conflict(deadlock=deadlock) if len(work) > 1 else len(work)
                if size < len(work):
                    # Smaller chunks from now on, this one included: the smaller
                    # chunk is the remedy, so no backoff first.
                    for part in attempt.parts(work, size):
                        self._finish(session, part, claimed=False)
                    return None
                self.blocking(time.sleep, backoff(tally.retries))
                continue
            if do is Do.ROLL_BACK:
                self.progress.roll_back(len(work))
                return None
            if do is Do.SETTLE and error is not None:
                return self._in_doubt(session, work, error, mark, good, failed)
            return error  # Do.FAIL or Do.ISOLATE: the caller fails the items or isolates them

    def _reclaim(self, session: Session, work: list) -> list:
        chunk = [(item, token) for item, token, _ in work]
        still = self.feed.reclaim(session, chunk)
        if still is chunk:
            return work
        ours = {token for _, token in still}
        return [w for w in work if w[1] in ours]

    def _process(self, session: Session, work: list) -> list[tuple[Any, BaseException]]:
        """Run the job's code on ``work`` in the open transaction; the items
        that failed because of themselves, isolated (and undone) there: by
        splitting the chunk, or, while bad items keep coming
        (attempt.ItemSavepoints), in groups of SAVEPOINT_EVERY items, each
        in a savepoint of its own from the start, split the same way."""
        if len(work) == 1:
            self._run(session, work)
            return []
        if self.batched:  # process_batch takes the chunk whole
            return self._isolating(session, work, whole=True)
        if self._savepoints.on:
            failed = []
            for group in attempt.parts(work, attempt.SAVEPOINT_EVERY):
                failed += self._isolating(session, group, whole=False, counted=True)
        else:
            failed = self._isolating(session, work, whole=True)
        self._savepoints.chunk(bad=bool(failed))
        return failed

    def _isolating(
        self, session: Session, part: list, *, whole: bool, counted: bool = False
    ) -> list[tuple[Any, BaseException]]:
        """``part`` in a savepoint. If an item's own error fails it, undo just
        the savepoint and try the pieces attempt.split gives (around the item
        whose process() raised, or halves), down to single items: the claim
        and the good items' work stay in the transaction; one bad item costs
        a few savepoints, not n transactions. A conflict or the database gone
        is not the items' fault: it ends the whole attempt (the caller
        retries, waits or settles as decided)."""
        undo = self.changes.mark(session) if self.changes is not None else None
        outer = session.get_nested_transaction()
        nested = session.begin_nested()
        try:
            self._run(session, part, locate=True)
            nested.commit()
            return []
        except Exception as raised:  # noqa: BLE001 - the job's code and the database's
            culprit, error = (raised.index, raised.error) if isinstance(raised, _FailedAt) else (None, raised)
            # Down to where this part began (the job's rollback() may have
            # left a savepoint of its own inside it).
            while (current := session.get_nested_transaction()) is not None and current is not outer:
                current.rollback()
            if self.changes is not None:
                self.changes.rewind(session, undo)
            if classify(error, bounded_wait=BOUNDED_WAIT in session.info) is not Kind.FATAL:
                raise error from error.__cause__  # the item's own error, for the attempt's decision
            if whole or (counted and len(part) > 1):  # a failed chunk's items, or a failed group's
                self.progress.replay(len(part))
            if whole:
                log.info("a chunk of %d items failed (%s): isolating its bad items", len(part), error)
            if len(part) == 1:
                return [(part[0], error)]
            found = []
            for piece in attempt.split(part, culprit):
                found += self._isolating(session, piece, whole=False)
            return found

    def _run(self, session: Session, work: list, *, locate: bool = False) -> None:
        """The job's code on ``work``. ``locate``: an error of one item's own
        process() comes wrapped with its position (see attempt.split)."""
        scope = self.in_hook(session) if self.in_hook is not None else _NO_SCOPE
        info = session.info
        with scope:
            info[JOB_CODE] = True  # db.job_code, inline: this runs once per item
            try:
                if self.batched and (len(work) > 1 or self.job.process is None):
                    self.job.process_batch(self.ctx, session, [value for _, _, value in work])
                    self._undone(session, "process_batch()" if len(work) > 1 else "process()")
                    return
                for index, (_, _, value) in enumerate(work):
                    try:
                        self.job.process(self.ctx, session, value)
                        if UNDONE_BY_JOB in info:
                            self._undone(session, "process()")
                    except Exception as error:
                        if locate:
                            raise _FailedAt(index, error) from error
                        raise
            finally:
                info.pop(JOB_CODE, None)

    @staticmethod
    def _undone(session: Session, hook: str) -> None:
        undone = session.info.pop(UNDONE_BY_JOB, None)
        if undone is not None:
            raise ItemRolledBack(
                f"{hook} called session.{undone}, which undid the item's work: the item fails (jobrunner "
                "commits or rolls back each item; raise to fail one)"
            )

    def _failed_alone(self, failed: list[tuple[Any, BaseException]]) -> None:
        """Items isolated in a transaction that committed: their failures
        were recorded in it, so the feed has nothing more to settle."""
        for (item, token, _), error in failed:
            self.on_failure(item, token, error, True)

    def _commit(self, session: Session, count: int, *, chunk: int) -> None:
        """Commit a chunk of ``chunk`` items; ``count`` of them are the job's
        (the rest failed alone)."""
        if self.before_commit is not None:
            self.before_commit(session)
        began = None
        if self.watch_sqlite_lock is not None:
            began = session.connection().info.get(BEGAN_INFO)
        session.commit()
        if self.changes is not None:  # a dry run: the savepoint was released
            self.changes.keep(session)
            self.progress.dry_committed(count, chunk=chunk)
        elif count:
            self.progress.committed(count, chunk=chunk)
        else:
            self.progress.chunk(chunk)
        if self.watch_sqlite_lock is not None and began is not None:
            if self.watch_sqlite_lock(time.monotonic() - began, count):
                self.watch_sqlite_lock = None  # said once: stop timing

    def _discard(self) -> None:
        if self.changes is not None:
            self.changes.discard()

    def _in_doubt(
        self,
        session: Session,
        work: list,
        error: BaseException,
        mark: Any,
        good: list,
        failed: list[tuple[Any, BaseException]],
    ) -> BaseException | None:
        """The connection died during COMMIT. Look (resume keys, or PostgreSQL's
        transaction status) once the database is back; if nobody can say, fail."""
        unknown = CommitInDoubt(
            f"the connection was lost while committing ({error_line(error)}): the outcome is "
            "unknown, so the item was not retried (define item_key to let jobrunner check)"
        )
        if attempt.before_settle(can_look=self.keys is not None or self.commit_check is not None) is Do.FAIL:
            return unknown
        while True:
            if not self.blocking(self.outage.wait, error):
                self.progress.roll_back(len(work))
                return None
            try:
                committed = self._look_up(session, good, mark)
                session.rollback()
                break
            except Exception as again:  # noqa: BLE001
                _rollback(session)
                if classify(again) is not Kind.GONE:  # a pooled connection from before the outage
                    return again
                error = again
        do = attempt.after_settle(committed)
        if do is Do.DONE:
            if good:
                self.progress.committed(len(good))
            self._failed_alone(failed)
            return None
        if do is Do.REDO:
            return self._transact(session, work, claimed=False)
        return unknown

    def _look_up(self, session: Session, good: list, mark: Any) -> bool | None:
        if self.keys is not None:
            if not good:
                return True  # only failures were recorded: nothing of the job's to redo
            return self.keys.committed(session, good[0][0])
        if self.commit_check is not None:
            return self.commit_check.committed(session, mark)
        return None


class SqliteLockWatch:
    """Says once when an item held SQLite's one write lock long enough to make
    the other workers wait: the first sign should not be a 30 s busy timeout."""

    def __init__(self, notice: Callable[[str], None]) -> None:
        self.notice = notice
        self.warned = False

    def __call__(self, held: float, items: int = 1) -> bool:
        """True once it has spoken."""
        if held > SLOW_SQLITE_HOLD_S and not self.warned:
            self.warned = True
            who = "an item" if items == 1 else f"a chunk of {items} items"
            self.notice(
                f"{who} held SQLite's write lock for {held:.2f}s, so the other workers waited: on "
                "SQLite, transactions run one at a time from their first statement to their commit. Do "
                "slow work that needs no database in prepare() (see docs/databases.md, SQLite)"
            )
        return self.warned


class Unprepared:
    """What a work entry carries instead of ``prepare``'s value when it raised
    (a feed that claims in the transaction): the item fails there."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _split_unprepared(work: list) -> tuple[list, list[tuple[Any, BaseException]]]:
    """``work`` without its Unprepared entries, and those as (entry, prepare's
    error), the form of the chunk's other failures. ``work`` itself when all
    were prepared, as they almost always are."""
    unprepared = [(w, w[2].error) for w in work if type(w[2]) is Unprepared]
    if not unprepared:
        return work, unprepared
    return [w for w in work if type(w[2]) is not Unprepared], unprepared


class _FailedAt(Exception):
    """The process() of the item at ``index`` of a part raised ``error``."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(index, error)
        self.index, self.error = index, error


def _failure(entry: Any, error: BaseException) -> tuple[Any, Any, str, str]:
    """(token, item, its repr, the error's line): a failure as the feed records it."""
    item, token, _ = entry
    return token, item, safe_repr(item), error_line(error)


def _rollback(session: Session) -> None:
    try:
        session.rollback()
    except Exception:
        log.debug("rollback failed", exc_info=True)
