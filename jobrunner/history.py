"""The run history (``jobrunner_runs``) and the keys that make --resume work.

History rows are written by the main thread in short transactions of their
own, never inside an item's transaction: at the start, at a checkpoint every
few seconds (so a run that dies shows what it had committed), and at the
end. A write that finds the database gone waits for it like the workers do,
within the outage bound. If a write still fails, the run goes on and says so:
bookkeeping must not stop the work.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, desc, func, insert, or_, select, update
from sqlalchemy.exc import SQLAlchemyError

from jobrunner import db as dbmod
from jobrunner import tables
from jobrunner.outage import Kind, Outage, classify
from jobrunner.result import COUNTS, RunResult, Status

log = logging.getLogger("jobrunner")
UNFINISHED = (
    Status.FAILED,
    Status.ABORTED,
    Status.INTERRUPTED,
    Status.CRASHED,
    Status.LOCK_LOST,
    Status.UNAVAILABLE,
)
CRASHED_NOTE = (
    "its end was never recorded: the process was killed, or the database was unreachable "
    "when it ended; the counts are those of its last checkpoint"
)
CRASHED_NOTE_KNOWN = (
    "its end was never recorded: the process was killed, or the database was unreachable "
    "when it ended; succeeded (and, for a distributed run, failed and commits) counts what it committed, "
    "the other counts are those of its last checkpoint"
)


NO_LOCK_STALE_S = 15 * 60
CHECKPOINT_S = 5.0


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def locked(runs: Any) -> Any:
    """Rows of runs that held the job's lock (rows older than the column did)."""
    return or_(runs.c.lock.is_(None), runs.c.lock != "none")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunRecorder:
    """Writes one run's history row; every failure becomes a notice."""

    def __init__(
        self,
        database: dbmod.Database,
        job: str,
        notice: Callable[[str], None],
        outage: Outage | None = None,
    ) -> None:
        self.database = database
        self.job = job
        self.notice = notice
        self.outage = outage
        self.run_id: int | None = None
        # Counts of the runs mark_crashed found dead: no metrics file ever saw them.
        self.crashed: list[dict[str, int]] = []

    def _write(self, what: str, action: Callable[[Any], Any], *, patient: bool = True) -> Any:
        """Run ``action`` in a transaction of its own. Patient: wait out an outage
        (within the bound). Impatient (checkpoints): give up at once, quietly;
        the next checkpoint will do."""
        while True:
            try:
                session = self.database.bookkeeping() if patient else self.database.impatient_session(2.0)
                with session, session.begin():
                    return action(session)
            except SQLAlchemyError as error:
                if patient and self.outage is not None and classify(error) is Kind.GONE:
                    if self.outage.wait(error):
                        continue
                message = f"cannot {what} in the run history: {dbmod.describe_error(error)}"
                if patient:
                    self.notice(message)
                else:
                    log.info("%s", message)
                return None

    def mark_crashed(self, *, holding_lock: bool) -> int:
        """Mark the runs of this job that ended without a word.

        Holding the job's lock, every other 'running' locked run is dead. A run
        under --no-lock proves nothing by running, so --no-lock rows are marked
        only when they show no sign of life: a process gone from this host, or
        no checkpoint for ``NO_LOCK_STALE_S``.
        """
        runs = tables.runs
        where = [runs.c.job == self.job, runs.c.status == Status.RUNNING.value]
        dead = [runs.c.id.in_(self._dead_no_lock_runs())]
        if holding_lock:
            dead.append(locked(runs))

        def mark(session: Any) -> int:
            ids = session.execute(select(runs.c.id).where(*where, or_(*dead))).scalars().all()
            for run_id in ids:
                values: dict[str, Any] = {"status": Status.CRASHED.value, "error": CRASHED_NOTE}
                known = _committed(session, run_id)
                if known:
                    values.update(known, error=CRASHED_NOTE_KNOWN)
                session.execute(update(runs).where(runs.c.id == run_id, *where).values(**values))
                row = session.execute(select(*(runs.c[k] for k in COUNTS)).where(runs.c.id == run_id)).one()
                self.crashed.append(dict(zip(COUNTS, row, strict=True)))
            return len(ids)

        count = self._write("mark crashed runs", mark)
        return count or 0

    def _dead_no_lock_runs(self) -> list[int]:
        runs = tables.runs
        host = socket.gethostname()
        stale = utcnow() - timedelta(seconds=NO_LOCK_STALE_S)
        try:
            with self.database.reader() as session:
                rows = session.execute(
                    select(runs.c.id, runs.c.host, runs.c.pid, runs.c.checkpoint_at).where(
                        runs.c.job == self.job, runs.c.status == Status.RUNNING.value, runs.c.lock == "none"
                    )
                ).all()
        except SQLAlchemyError:
            return []
        return [
            row.id
            for row in rows
            if (row.host == host and not pid_alive(row.pid))
            or (row.checkpoint_at is not None and row.checkpoint_at < stale)
        ]

    def start(
        self,
        *,
        dry_run: bool,
        workers: int,
        batch_size: int,
        lock: str,
        resumed_from: int | None,
        accepts_helpers: bool = False,
    ) -> int | None:
        now = utcnow()
        values = {
            "job": self.job,
            "status": Status.RUNNING.value,
            "dry_run": dry_run,
            "started_at": now,
            "checkpoint_at": now,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "workers": workers,
            "batch_size": batch_size,
            "lock": lock,
            "resumed_from": resumed_from,
            # Known from the first moment: a --join start that lost the race for
            # the lock decides at once whether it may help.
            "accepts_helpers": accepts_helpers,
            **dict.fromkeys(COUNTS, 0),
        }
        self.run_id = self._write(
            "record this run",
            # inserted_primary_key, not RETURNING: MySQL has no INSERT ... RETURNING.
            lambda s: s.execute(insert(tables.runs).values(**values)).inserted_primary_key[0],
        )
        return self.run_id

    def checkpoint_statement(self, counts: dict[str, Any]) -> Any:
        return (
            update(tables.runs)
            .where(tables.runs.c.id == self.run_id, tables.runs.c.status == Status.RUNNING.value)
            .values(checkpoint_at=utcnow(), **{k: counts[k] for k in COUNTS})
        )

    def checkpoint(self, counts: dict[str, Any]) -> None:
        """Bring the row's counts up to date in a transaction of its own."""
        if self.run_id is None:
            return
        statement = self.checkpoint_statement(counts)
        # Impatient: a checkpoint is skipped rather than queue behind the workers.
        self._write("record a checkpoint", lambda s: s.execute(statement), patient=False)

    def still_ours(self) -> bool:
        """After the lock was lost and taken again: did another run of the job
        take it meanwhile? (It would have marked this run crashed, and started
        a row of its own.)"""
        runs = tables.runs
        with self.database.bookkeeping() as session:
            status = session.scalar(select(runs.c.status).where(runs.c.id == self.run_id))
            later = session.scalar(
                select(runs.c.id)
                .where(runs.c.job == self.job, runs.c.id > self.run_id, locked(runs))
                .limit(1)
            )
        return status == Status.RUNNING.value and later is None

    def finish(self, result: RunResult, *, patient: bool = True) -> bool:
        if self.run_id is None:
            return False
        statement = (
            update(tables.runs)
            .where(tables.runs.c.id == self.run_id)
            .values(
                status=result.status.value,
                finished_at=utcnow(),
                checkpoint_at=utcnow(),
                error=result.error,
                **{k: getattr(result, k) for k in COUNTS},
            )
        )
        done = self._write("record the end of this run", lambda s: s.execute(statement), patient=patient)
        return done is not None


class Checkpoints:
    """Every CHECKPOINT_S, bring the run's history row up to date, so that a run
    that dies shows what it had committed.

    On a server the main thread writes it, in a transaction of its own. On
    SQLite the workers hold the one write lock nearly all the time, and a
    separate writer starves in SQLite's busy handler (measured: no checkpoint
    in 6 s at 4 workers); there the next worker to commit writes it in its own
    transaction, which already holds the lock: one more UPDATE per interval.
    """

    def __init__(self, recorder: RunRecorder, progress: Any, *, by_workers: bool) -> None:
        self.recorder = recorder
        self.progress = progress
        self.by_workers = by_workers
        self._due = threading.Event()
        self._next = time.monotonic() + CHECKPOINT_S

    def tick(self) -> None:
        """The main thread, a few times a second."""
        now = time.monotonic()
        if now < self._next or self.recorder.run_id is None:
            return
        self._next = now + CHECKPOINT_S
        if self.by_workers:
            self._due.set()
        else:
            self.recorder.checkpoint(self.progress.snapshot())

    def in_transaction(self, session: Any) -> None:
        """A worker, just before it commits."""
        if self._due.is_set():
            self._due.clear()
            session.execute(self.recorder.checkpoint_statement(self.progress.snapshot()))


@dataclasses.dataclass(frozen=True)
class Opening:
    run_id: int | None
    resumed_from: int | None
    skip_keys: frozenset[str]


def open_run(
    recorder: RunRecorder,
    config: Any,
    *,
    lock: str,
    resumable: bool,
    info: Callable[[str], None] | None = None,
) -> Opening:
    """Start a run's history, once the lock is held (or without one, under
    --no-lock): mark dead runs crashed, find what --resume skips, add our row."""
    crashed = recorder.mark_crashed(holding_lock=lock != "none")
    if crashed:
        recorder.notice(f"marked {crashed} earlier run(s) of {recorder.job} as crashed")
    resumed_from, skip = None, frozenset[str]()
    if config.resume:
        latest, chain = resume_point(recorder.database, recorder.job, before=None)
        if latest is None:
            # An ordinary start of a job whose config says resume = true: no warning.
            (info or recorder.notice)(f"nothing to resume: the latest run of {recorder.job} finished")
        else:
            skip = frozenset(committed_keys(recorder.database, chain))
            resumed_from = latest
            recorder.notice(f"resuming run {latest}: {len(skip)} items already committed are skipped")
    run_id = recorder.start(
        dry_run=config.dry_run,
        workers=1 if config.dry_run else config.workers,  # a dry run is one transaction in one thread
        batch_size=config.batch_size,
        lock=lock,
        resumed_from=resumed_from,
        accepts_helpers=config.distributed and not config.dry_run,
    )
    if resumable and run_id is None and not config.dry_run:
        recorder.notice("item keys cannot be recorded without a history row: --resume will not skip")
    return Opening(run_id, resumed_from, skip)


class KeyRecorder:
    """Resume keys of one run, written in each chunk's own transaction."""

    def __init__(self, run_id: int, item_key: Callable[[Any], Any]) -> None:
        self.run_id = run_id
        self.item_key = item_key

    def record(self, session: Any, items: list[Any]) -> None:
        rows = [{"run_id": self.run_id, "key": str(self.item_key(item))} for item in items]
        session.execute(insert(tables.item_keys), rows)

    def committed(self, session: Any, item: Any) -> bool:
        keys = tables.item_keys
        found = session.scalar(
            select(keys.c.key).where(keys.c.run_id == self.run_id, keys.c.key == str(self.item_key(item)))
        )
        return found is not None


def resume_point(database: dbmod.Database, job: str, before: int | None) -> tuple[int | None, list[int]]:
    """The latest non-dry run to resume, if unfinished, and the chain it resumed."""
    runs = tables.runs
    query = select(runs.c.id, runs.c.status, runs.c.resumed_from).where(
        runs.c.job == job, runs.c.dry_run.is_(False)
    )
    if before is not None:
        query = query.where(runs.c.id < before)
    with database.bookkeeping() as session:
        latest = session.execute(query.order_by(desc(runs.c.id)).limit(1)).first()
        if latest is None or Status(latest.status) not in UNFINISHED:
            return None, []
        chain = [latest.id]
        parent = latest.resumed_from
        while parent is not None and parent not in chain:
            chain.append(parent)
            parent = session.scalar(select(runs.c.resumed_from).where(runs.c.id == parent))
    return latest.id, chain


def committed_keys(database: dbmod.Database, run_ids: list[int]) -> set[str]:
    """Every item key those runs committed: one query, kept in memory, so the
    producer never queries per item."""
    if not run_ids:
        return set()
    with database.bookkeeping() as session:
        rows = session.execute(
            select(tables.item_keys.c.key).where(tables.item_keys.c.run_id.in_(run_ids))
        ).yield_per(10_000)
        return {key for (key,) in rows}


def list_runs(database: dbmod.Database, job: str | None, limit: int) -> list[dict[str, Any]]:
    """Runs, newest first, each with the processes that worked on it (a
    distributed run's leader and helpers; empty for a single process)."""
    runs, processes = tables.runs, tables.run_processes
    query = select(runs).order_by(desc(runs.c.started_at), desc(runs.c.id)).limit(limit)
    if job is not None:
        query = query.where(runs.c.job == job)
    with database.reader() as session:
        found = [dict(row) for row in session.execute(query).mappings()]
        ids = [run["id"] for run in found]
        members = session.execute(
            select(processes).where(processes.c.run_id.in_(ids)).order_by(processes.c.started_at)
        ).mappings()
        by_run: dict[int, list[dict[str, Any]]] = {}
        for member in members:
            by_run.setdefault(member["run_id"], []).append(
                {k: v for k, v in dict(member).items() if k != "run_id"}
            )
    for run in found:
        run["processes"] = by_run.get(run["id"], [])
    return found


def helpers_of(database: dbmod.Database, run_id: int, alive_within: float) -> list[dict[str, Any]]:
    """The helpers of a run that still show signs of life."""
    processes = tables.run_processes
    since = utcnow() - timedelta(seconds=alive_within)
    with database.reader() as session:
        rows = session.execute(
            select(processes).where(
                processes.c.run_id == run_id,
                processes.c.role == "helper",
                processes.c.status == Status.RUNNING.value,
                processes.c.checkpoint_at >= since,
            )
        ).mappings()
        return [dict(row) for row in rows]


def running(database: dbmod.Database) -> list[dict[str, Any]]:
    """Runs whose rows say 'running', newest first (live or not: see ``status.py``)."""
    runs = tables.runs
    query = select(runs).where(runs.c.status == Status.RUNNING.value).order_by(desc(runs.c.id))
    with database.reader() as session:
        return [dict(row) for row in session.execute(query).mappings()]


def chunk_commits(session: Any, run_id: int) -> int:
    """The chunk transactions a distributed run committed, over all its
    processes, as they counted themselves (worktable._counting)."""
    counts = tables.chunk_commits
    return int(session.scalar(select(func.sum(counts.c.commits)).where(counts.c.run_id == run_id)) or 0)


def purge(database: dbmod.Database, before: datetime, job: str | None) -> tuple[int, int]:
    """Delete finished runs started before ``before``, and their item keys."""
    runs = tables.runs
    condition = [runs.c.started_at < before, runs.c.status != Status.RUNNING.value]
    if job is not None:
        condition.append(runs.c.job == job)
    with database.bookkeeping() as session, session.begin():
        ids = select(runs.c.id).where(and_(*condition))
        keys = rowcount(session.execute(delete(tables.item_keys).where(tables.item_keys.c.run_id.in_(ids))))
        session.execute(delete(tables.chunk_commits).where(tables.chunk_commits.c.run_id.in_(ids)))
        count = rowcount(session.execute(delete(runs).where(*condition)))
    return count, keys


def show(config: Any, job: str | None, limit: int) -> list[dict[str, Any]]:
    """``jobrunner history``: the latest runs, newest first. Creates nothing."""
    with tables.existing_database(config, job or "history") as database:
        return list_runs(database, job, limit) if database is not None else []


def purge_before(config: Any, before: datetime, job: str | None) -> tuple[int, int]:
    """``jobrunner history --purge-before``; ``before`` is local time if naive."""
    cutoff = before.astimezone(UTC).replace(tzinfo=None)
    with tables.existing_database(config, job or "history") as database:
        return purge(database, cutoff, job) if database is not None else (0, 0)


def rowcount(result: Any) -> int:
    """Rows a DML statement changed (a CursorResult's; typed loosely by SQLAlchemy)."""
    return int(result.rowcount)


def _committed(session: Any, run_id: int) -> dict[str, int]:
    """What a run that died had committed, when the database can say: a
    distributed run's items left its work table by a commit or a recorded
    failure; a resumable run's keys commit with its items. Empty if unknown."""
    runs, work, failures, keys = tables.runs, tables.work, tables.failures, tables.item_keys
    fed = session.scalar(select(runs.c.fed).where(runs.c.id == run_id)) or 0

    def count(table: Any) -> int:
        return session.scalar(select(func.count()).select_from(table).where(table.c.run_id == run_id)) or 0

    if fed:
        failed = count(failures)
        return {
            "succeeded": fed - failed - count(work),
            "failed": failed,
            "commits": chunk_commits(session, run_id),
        }
    committed = count(keys)
    return {"succeeded": committed} if committed else {}
