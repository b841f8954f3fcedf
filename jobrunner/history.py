"""The run history (``jobrunner_runs``) and the keys that make --resume work.

History rows are written by the main thread in short transactions of their
own, never inside an item's transaction. If they cannot be written the run
goes on and says so: bookkeeping must not stop the work.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, desc, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from jobrunner import db as dbmod
from jobrunner import tables
from jobrunner.result import RunResult, Status

log = logging.getLogger("jobrunner")
UNFINISHED = (Status.FAILED, Status.ABORTED, Status.INTERRUPTED, Status.CRASHED, Status.LOCK_LOST)


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class RunRecorder:
    """Writes one run's history row; every failure becomes a notice."""

    def __init__(self, database: dbmod.Database, job: str, notice: Callable[[str], None]) -> None:
        self.database = database
        self.job = job
        self.notice = notice
        self.run_id: int | None = None

    def _write(self, what: str, action: Callable[[Any], Any], *, patient: bool = True) -> Any:
        try:
            session = self.database.session() if patient else self.database.impatient_session(2.0)
            with session, session.begin():
                return action(session)
        except SQLAlchemyError as error:
            self.notice(f"cannot {what} in the run history: {dbmod.describe_error(error, self.database.url)}")
            return None

    def mark_crashed(self) -> int:
        """Runs of this job still 'running' died without a word: we hold the lock now."""
        statement = (
            update(tables.runs)
            .where(tables.runs.c.job == self.job, tables.runs.c.status == Status.RUNNING.value)
            .values(
                status=Status.CRASHED.value, error="the process died while running (found by a later run)"
            )
        )
        count = self._write("mark crashed runs", lambda s: s.execute(statement).rowcount)
        return count or 0

    def start(self, *, dry_run: bool, workers: int, resumed_from: int | None) -> int | None:
        values = {
            "job": self.job,
            "status": Status.RUNNING.value,
            "dry_run": dry_run,
            "started_at": utcnow(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "workers": workers,
            "resumed_from": resumed_from,
        }
        self.run_id = self._write(
            "record this run",
            lambda s: s.execute(
                insert(tables.runs).values(**values).returning(tables.runs.c.id)
            ).scalar_one(),
        )
        return self.run_id

    def finish(self, result: RunResult, *, patient: bool = True) -> None:
        if self.run_id is None:
            return
        statement = (
            update(tables.runs)
            .where(tables.runs.c.id == self.run_id)
            .values(
                status=result.status.value,
                finished_at=utcnow(),
                succeeded=result.succeeded,
                failed=result.failed,
                retried=result.retried,
                skipped=result.skipped,
                error=result.error,
            )
        )
        self._write("record the end of this run", lambda s: s.execute(statement), patient=patient)


def resume_point(database: dbmod.Database, job: str, before: int | None) -> tuple[int | None, list[int]]:
    """The latest non-dry run to resume, if unfinished, and the chain it resumed."""
    runs = tables.runs
    query = select(runs.c.id, runs.c.status, runs.c.resumed_from).where(
        runs.c.job == job, runs.c.dry_run.is_(False)
    )
    if before is not None:
        query = query.where(runs.c.id < before)
    with database.session(read_only=True) as session:
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
    with database.session(read_only=True) as session:
        rows = session.execute(
            select(tables.item_keys.c.key).where(tables.item_keys.c.run_id.in_(run_ids))
        ).yield_per(10_000)
        return {key for (key,) in rows}


def record_key(session: Any, run_id: int, key: str) -> None:
    session.execute(insert(tables.item_keys).values(run_id=run_id, key=key))


def list_runs(database: dbmod.Database, job: str | None, limit: int) -> list[dict[str, Any]]:
    runs = tables.runs
    query = select(runs).order_by(desc(runs.c.started_at), desc(runs.c.id)).limit(limit)
    if job is not None:
        query = query.where(runs.c.job == job)
    with database.session(read_only=True) as session:
        return [dict(row) for row in session.execute(query).mappings()]


def purge(database: dbmod.Database, before: datetime, job: str | None) -> tuple[int, int]:
    """Delete finished runs started before ``before``, and their item keys."""
    runs = tables.runs
    condition = [runs.c.started_at < before, runs.c.status != Status.RUNNING.value]
    if job is not None:
        condition.append(runs.c.job == job)
    with database.session() as session, session.begin():
        ids = select(runs.c.id).where(*condition)
        keys = session.execute(delete(tables.item_keys).where(tables.item_keys.c.run_id.in_(ids))).rowcount
        count = session.execute(delete(runs).where(*condition)).rowcount
    return count, keys


def show(config: Any, job: str | None, limit: int) -> list[dict[str, Any]]:
    """``jobrunner history``: the latest runs, newest first."""
    with tables.ready_database(config, job or "history") as database:
        return list_runs(database, job, limit)


def purge_before(config: Any, before: datetime, job: str | None) -> tuple[int, int]:
    """``jobrunner history --purge-before``; ``before`` is local time if naive."""
    cutoff = before.astimezone(UTC).replace(tzinfo=None)
    with tables.ready_database(config, job or "history") as database:
        return purge(database, cutoff, job)
