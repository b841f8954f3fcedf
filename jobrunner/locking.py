"""The singleton guard: one run per job at a time.

A dedicated session (from the run's session factory, on an engine of its own)
holds a lock in an open transaction for the whole run. Nothing is leased or
expires: the lock ends with that transaction, at the end of the run, or when
the database sees the process die.

- PostgreSQL, ``lock = "row"`` (default): ``SELECT ... FOR UPDATE NOWAIT`` on
  the job's row of ``jobrunner_locks``. The row is inserted first in a
  transaction of its own: a lock on a missing row excludes no one, and an
  upsert inside the guard transaction would block a second starter instead
  of failing it.
- PostgreSQL, ``lock = "advisory"``: ``pg_try_advisory_xact_lock`` in the same
  kind of open transaction. Same exclusion and crash release, but the
  transaction takes no xid, so it does not hold back VACUUM on a long run.
- SQLite: ``with_for_update()`` compiles to a plain SELECT there, and an open
  write transaction on the main database would block every worker. So the
  guard holds ``BEGIN IMMEDIATE`` on a small lock database beside the main
  file (``<db>.<job>.lock``), opened with no busy timeout: a second starter
  gets SQLITE_BUSY at once, and the operating system drops the file lock when
  the process dies.

One thread owns the guard session from acquisition to release and heartbeats
it; no other thread touches it. A failed heartbeat, or a changed backend pid
(a session that silently reconnected no longer holds the lock), marks the
lock lost; it is never rolled back and retried.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from sqlalchemy import exc, func, select, text
from sqlalchemy.dialects import postgresql, sqlite

from jobrunner import db as dbmod
from jobrunner import tables
from jobrunner.exceptions import DatabaseUnavailable, JobrunnerError, LockHeld

POLL_INTERVAL_S = 0.1
LOCK_NOT_AVAILABLE = "55P03"


def advisory_key(job: str) -> int:
    digest = hashlib.blake2b(f"jobrunner:{job}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class Guard:
    """Hold the job's lock for the ``with`` block; raise :class:`LockHeld` if taken.

    ``lost`` becomes set, and ``on_lost(reason)`` is called, if the lock is
    lost while held.
    """

    def __init__(
        self,
        database: dbmod.Database,
        job: str,
        *,
        mode: str = "row",
        wait: float = 0.0,
        heartbeat: float = 1.0,
        on_lost: Callable[[str], None] | None = None,
        record_holder: bool = True,
    ) -> None:
        self.database = database
        self.job = job
        self.mode = "file" if database.is_sqlite else mode
        self.wait = wait
        self.heartbeat = heartbeat
        self.on_lost = on_lost
        self.record_holder = record_holder
        self.lost = threading.Event()
        self.lost_reason: str | None = None
        self._acquired = threading.Event()
        self._release = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # -- the owner thread's side -------------------------------------------
    def __enter__(self) -> Guard:
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
        if self._thread is not None:
            self._thread.join(timeout)

    def check(self) -> bool:
        """True while the lock is held. Workers call this before each commit."""
        return not self.lost.is_set()

    # -- the guard thread ---------------------------------------------------
    def _own(self) -> None:
        session = None
        try:
            session = self.database.guard_session(self.job)
            backend = self._acquire(session)
            if self.record_holder:
                self._write_holder()
        except BaseException as error:  # noqa: BLE001 - handed to the owner thread
            self._error = _as_jobrunner_error(error, self.database.url)
            if session is not None:
                _close_quietly(session)
            self._acquired.set()
            return
        self._acquired.set()
        try:
            while not self._release.wait(self.heartbeat):
                if not self._beat(session, backend):
                    return
            try:
                session.rollback()  # ends the transaction: the lock is released
            except exc.DBAPIError:
                pass
        finally:
            _close_quietly(session)

    def _acquire(self, session: Any) -> Any:
        deadline = time.monotonic() + self.wait
        if self.mode == "row":
            self._ensure_row(session)
        while True:
            if self._try_lock(session):
                return self._backend_id(session)
            session.rollback()
            if time.monotonic() >= deadline:
                raise LockHeld(self.job, read_holder(self.database, self.job))
            time.sleep(min(POLL_INTERVAL_S, max(0.0, deadline - time.monotonic())))

    def _ensure_row(self, session: Any) -> None:
        insert = postgresql.insert(tables.locks).values(job=self.job).on_conflict_do_nothing()
        session.execute(insert)
        session.commit()

    def _try_lock(self, session: Any) -> bool:
        try:
            if self.mode == "file":
                session.execute(text("SELECT 1"))  # BEGIN IMMEDIATE, no busy timeout
                return True
            if self.mode == "advisory":
                return bool(session.scalar(select(func.pg_try_advisory_xact_lock(advisory_key(self.job)))))
            session.execute(
                select(tables.locks.c.job).where(tables.locks.c.job == self.job).with_for_update(nowait=True)
            ).one()
            return True
        except exc.OperationalError as error:
            if dbmod.sqlstate(error) == LOCK_NOT_AVAILABLE or (
                self.mode == "file" and dbmod.is_sqlite_busy(error)
            ):
                return False
            raise

    def _backend_id(self, session: Any) -> Any:
        if self.mode == "file":
            return None
        return session.scalar(select(func.pg_backend_pid()))

    def _beat(self, session: Any, backend: Any) -> bool:
        try:
            current = session.scalar(text("SELECT 1") if backend is None else select(func.pg_backend_pid()))
        except Exception as error:  # noqa: BLE001 - any failure means the lock is gone
            self._mark_lost(
                f"the lock's database connection failed: {dbmod.describe_error(error, self.database.url)}"
            )
            return False
        if backend is not None and current != backend:
            self._mark_lost("the lock's database connection was replaced")
            return False
        return True

    def _mark_lost(self, reason: str) -> None:
        self.lost_reason = reason
        self.lost.set()
        if self.on_lost is not None:
            self.on_lost(reason)

    def _write_holder(self) -> None:
        values = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": datetime.now(UTC).replace(tzinfo=None),
        }
        dialect = postgresql if not self.database.is_sqlite else sqlite
        statement = dialect.insert(tables.lock_holders).values(job=self.job, **values)
        statement = statement.on_conflict_do_update(index_elements=["job"], set_=values)
        with self.database.session() as session, session.begin():
            session.execute(statement)


def read_holder(database: dbmod.Database, job: str) -> dict[str, Any]:
    """Who last took the job's lock: host, pid, since (local time)."""
    try:
        with database.session(read_only=True) as session:
            row = (
                session.execute(select(tables.lock_holders).where(tables.lock_holders.c.job == job))
                .mappings()
                .first()
            )
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
    """The holder if a run holds the job's lock now, else None.

    It takes the lock for an instant when free, so a starter racing this
    probe may see the job as running (exit 75) for those milliseconds.
    """
    try:
        with Guard(database, job, mode=mode, record_holder=False):
            return None
    except LockHeld as held:
        return held.holder or {"pid": None}


def _as_jobrunner_error(error: BaseException, url: str) -> BaseException:
    if isinstance(error, JobrunnerError):
        return error
    if isinstance(error, exc.DBAPIError):
        return DatabaseUnavailable(f"cannot take the job's lock: {dbmod.describe_error(error, url)}")
    return error


def _close_quietly(session: Any) -> None:
    try:
        session.close()
    except Exception:  # noqa: BLE001 - the connection may already be gone
        pass


def lock_status(config: Any) -> list[dict[str, Any]]:
    """For ``jobrunner status``: each job of the jobs folder and its lock."""
    from jobrunner import jobs

    found = jobs.discover(config.jobs_path)
    rows: list[dict[str, Any]] = []
    if not found:
        return rows
    with tables.ready_database(config, "status") as database:
        for info in found:
            section = config.job_sections.get(info.name, {})
            row: dict[str, Any] = {"job": info.name, "running": False, "holder": None}
            if section.get("no_lock", config.no_lock):
                row["lock"] = "none"
            else:
                row["lock"] = "file" if database.is_sqlite else section.get("lock", config.lock)
                holder = probe(database, info.name, row["lock"])
                row["running"] = holder is not None
                row["holder"] = holder
            rows.append(row)
    return rows
