"""jobrunner's SQL for the job's lock: the lock itself (a row, an advisory
key, or SQLite's lock file), the holder's row, and the backend that holds
it. One store per database family, with the differences inside it;
``locking.py`` decides when to take, keep and let go, and asks the store how.
"""

from __future__ import annotations

import hashlib
import os
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, exc, func, select, text
from sqlalchemy.dialects import mysql, postgresql, sqlite

from jobrunner import db as dbmod
from jobrunner import tables
from jobrunner.outage import is_sqlite_busy, mysql_code

# MySQL/MariaDB: what FOR UPDATE NOWAIT raises when another session holds the
# row. MySQL 8: ER_LOCK_NOWAIT (3572). MariaDB: ER_LOCK_WAIT_TIMEOUT (1205),
# raised at once under NOWAIT. Only for the guard's own statement is it "held".
MYSQL_LOCK_HELD = {3572, 1205}


def advisory_key(job: str) -> int:
    digest = hashlib.blake2b(f"jobrunner:{job}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def helpers_key(job: str) -> int:
    """The advisory key every helper of a run of ``job`` holds, shared, while it may commit."""
    return advisory_key(f"helpers:{job}")


def backend_identity(session: Any) -> tuple[int, str]:
    """PostgreSQL: this connection's backend pid, and ``pid@backend_start``:
    unlike a pid alone, never reused by a later connection."""
    pid, started = session.execute(
        text("SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()")
    ).one()
    return pid, f"{pid}@{started.isoformat()}"


class LockStore:
    """PostgreSQL's: the job's advisory key in either mode, and in ``row``
    mode also its row of ``jobrunner_locks`` ``FOR UPDATE SKIP LOCKED``."""

    def __init__(self, database: dbmod.Database) -> None:
        self.database = database

    def mode(self, wanted: str) -> str:
        """The mode a guard of this database holds, given the configured one."""
        return wanted

    def probe_mode(self, job: str, wanted: str) -> str | None:
        """The mode in which to look whether the lock is held now; None when
        no run has ever held it (there is nothing to look at)."""
        return "advisory"  # every run on PostgreSQL holds the job's advisory key (see try_lock)

    def ensure_row(self, session: Any, job: str) -> None:
        """The job's lock row exists (a lock on a missing row excludes no one)."""
        session.execute(postgresql.insert(tables.locks).values(job=job).on_conflict_do_nothing())
        session.commit()

    def has_row(self, session: Any, job: str) -> bool:
        return bool(session.scalar(select(func.count()).where(tables.locks.c.job == job)))

    def try_lock(self, session: Any, job: str, mode: str) -> bool:
        """Take the job's lock in ``session``'s transaction if it is free; never waits."""
        # The advisory key in either mode, so that a run under the row lock
        # and one under the advisory lock (a distributed run's leader always
        # takes it, see roles.Leading) exclude each other.
        advisory = bool(session.scalar(select(func.pg_try_advisory_xact_lock(advisory_key(job)))))
        if mode == "advisory" or not advisory:
            return advisory
        row = session.execute(
            select(tables.locks.c.job).where(tables.locks.c.job == job).with_for_update(skip_locked=True)
        ).first()
        return row is not None

    def let_go(self, session: Any, job: str, mode: str) -> None:
        """Before the guard's transaction ends: what ending it does not release."""

    def backend(self, session: Any, mode: str) -> tuple[Any, str | None]:
        """The lock connection's server process (its pid, and a name that is
        never reused), by which the guard sees a connection that silently
        reconnected and no longer holds the lock."""
        return backend_identity(session)

    def backend_query(self) -> Any:
        """The statement that names this connection's server process."""
        return select(func.pg_backend_pid())

    def write_holder(self, session: Any, job: str, since: datetime) -> None:
        """Say who holds the job's lock: this host and process, since when."""
        values = self._holder(since)
        statement = self._insert(tables.lock_holders).values(job=job, **values)
        session.execute(statement.on_conflict_do_update(index_elements=["job"], set_=values))

    def forget_holder(self, session: Any, job: str) -> None:
        """This process's holder row goes (a row of another's stays)."""
        holders = tables.lock_holders
        session.execute(
            delete(holders).where(
                holders.c.job == job, holders.c.pid == os.getpid(), holders.c.host == socket.gethostname()
            )
        )

    def read_holder(self, session: Any, job: str) -> Any:
        holders = tables.lock_holders
        return session.execute(select(holders).where(holders.c.job == job)).mappings().first()

    @staticmethod
    def _holder(since: datetime) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "since": since}

    @staticmethod
    def _insert(table: Any) -> Any:
        return postgresql.insert(table)


class MysqlLockStore(LockStore):
    """MySQL and MariaDB: the job's row ``FOR UPDATE NOWAIT``, or a named
    session lock (``GET_LOCK``) in ``advisory`` mode."""

    def probe_mode(self, job: str, wanted: str) -> str | None:
        return wanted

    def ensure_row(self, session: Any, job: str) -> None:
        # Look first: InnoDB's duplicate check takes a lock on the existing
        # row, so INSERT IGNORE would wait behind the holder's FOR UPDATE.
        if not self.has_row(session, job):
            session.execute(mysql.insert(tables.locks).values(job=job).prefix_with("IGNORE"))
        session.commit()

    def try_lock(self, session: Any, job: str, mode: str) -> bool:
        try:
            if mode == "advisory":
                # A session lock, not a transaction's: released by RELEASE_LOCK
                # or when the connection ends (see let_go).
                return session.scalar(select(func.get_lock(self.lock_name(job), 0))) == 1
            row = session.execute(
                select(tables.locks.c.job).where(tables.locks.c.job == job).with_for_update(nowait=True)
            ).first()
            return row is not None
        except exc.OperationalError as error:
            if mysql_code(error) in MYSQL_LOCK_HELD:
                return False
            raise

    def let_go(self, session: Any, job: str, mode: str) -> None:
        if mode == "advisory":
            session.execute(select(func.release_lock(self.lock_name(job))))

    def backend(self, session: Any, mode: str) -> tuple[Any, str | None]:
        return session.scalar(self.backend_query()), None

    def backend_query(self) -> Any:
        return select(func.connection_id())

    def write_holder(self, session: Any, job: str, since: datetime) -> None:
        values = self._holder(since)
        statement = mysql.insert(tables.lock_holders).values(job=job, **values)
        session.execute(statement.on_duplicate_key_update(**values))

    @staticmethod
    def lock_name(job: str) -> str:
        """GET_LOCK names are at most 64 characters."""
        return f"jobrunner:{advisory_key(job):x}"


class SqliteLockStore(LockStore):
    """SQLite: ``with_for_update()`` compiles to a plain SELECT there, and an
    open write transaction on the main database would block every worker.
    So the guard holds ``BEGIN IMMEDIATE`` on a small lock database beside the
    main file (``<db>.<job>.lock``), opened with no busy timeout."""

    def mode(self, wanted: str) -> str:
        return "file"

    def probe_mode(self, job: str, wanted: str) -> str | None:
        return "file" if Path(dbmod.lock_database_path(self.database.url, job)).exists() else None

    def try_lock(self, session: Any, job: str, mode: str) -> bool:
        try:
            session.execute(text("SELECT 1"))  # BEGIN IMMEDIATE, no busy timeout
            return True
        except exc.OperationalError as error:
            if is_sqlite_busy(error):
                return False
            raise

    def backend(self, session: Any, mode: str) -> tuple[Any, str | None]:
        return None, None  # the lock file's transaction ends only with this process

    @staticmethod
    def _insert(table: Any) -> Any:
        return sqlite.insert(table)


def lock_store(database: dbmod.Database) -> LockStore:
    if database.is_sqlite:
        return SqliteLockStore(database)
    if database.family == "mysql":
        return MysqlLockStore(database)
    return LockStore(database)
