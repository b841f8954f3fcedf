"""Engines, pools and sessions for one run.

SQLite rules (measured, see the README's "SQLite" section): WAL, a 30 s busy
timeout, and ``BEGIN IMMEDIATE`` for every writing transaction. pysqlite's
default opens no transaction for a SELECT, so two workers doing
read-modify-write on one row lose an update; a plain ``BEGIN`` that later
upgrades to a write lock fails at once with SQLITE_BUSY instead of waiting.
Taking the write lock up front makes writers queue on the busy timeout. The
items reader uses a deferred BEGIN: in WAL mode it never blocks the writers.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from sqlalchemy import create_engine, event, exc
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from jobrunner.config import Config, redact_url
from jobrunner.exceptions import ConfigError, DatabaseUnavailable

SQLITE_BUSY_TIMEOUT_S = 30.0
BEGIN_OPTION = "jobrunner_sqlite_begin"
# Client and server keepalives both (NOTES: client-only leaves the server
# backend holding the lock for minutes after a network cut).
PG_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
PG_SERVER_OPTIONS = "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3"
APP_NAME_MAX = 63  # PostgreSQL truncates application_name at NAMEDATALEN - 1


@dataclasses.dataclass
class Database:
    """The run's engine and its one session factory."""

    url: str
    engine: Engine
    session_factory: sessionmaker[Session]
    dialect: str
    job: str
    _extra_engines: list[Engine] = dataclasses.field(default_factory=list)

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    def session(self, *, read_only: bool = False) -> Session:
        """A new Session owned by the calling thread (checked at each BEGIN)."""
        if read_only:
            return self._owned(self.engine.execution_options(**{BEGIN_OPTION: "DEFERRED"}))
        return self._owned(self.engine)

    def _owned(self, bind: Any) -> Session:
        # Records the thread that made it: _check_owner refuses a transaction
        # begun by any other.
        session = self.session_factory(bind=bind)
        session.info["owner_thread"] = threading.get_ident()
        return session

    def impatient_session(self, timeout: float) -> Session:
        """A session whose writes wait at most ``timeout`` s for SQLite's write
        lock: for bookkeeping while abandoned workers may still hold it."""
        if not self.is_sqlite:
            return self.session()
        engine = _sqlite_engine(make_url(self.url).database or "", pool_size=1, timeout=timeout)
        self._extra_engines.append(engine)
        return self._owned(engine)

    def guard_session(self, job: str) -> Session:
        """The singleton guard's session: same factory, an engine of its own.

        Its own engine gives it its own application_name, connection options
        (no idle_in_transaction_session_timeout) and pool, so invalidating a
        worker's pool never touches the guard's connection.
        """
        if self.is_sqlite:
            # The lock database keeps the rollback journal: nothing reads it
            # while the guard writes, and it needs no -wal/-shm files.
            engine = _sqlite_engine(lock_database_path(self.url, job), pool_size=1, timeout=0, wal=False)
        else:
            engine = _postgres_engine(
                self.url,
                pool_size=1,
                max_overflow=0,
                application_name=f"jobrunner {job} lock",
                server_options=PG_SERVER_OPTIONS + " -c idle_in_transaction_session_timeout=0",
            )
        self._extra_engines.append(engine)
        return self._owned(engine)

    def dispose(self) -> None:
        for engine in (self.engine, *self._extra_engines):
            engine.dispose()


def open_database(config: Config, job: str, *, workers: int = 1) -> Database:
    """Create the engine and check that the database answers."""
    url = config.database_url
    try:
        dialect = make_url(url).get_backend_name()
    except exc.ArgumentError:
        raise ConfigError(f"database URL {redact_url(url)!r} is malformed") from None
    # workers + the items session + the setup/history session + spare
    pool_size = workers + 3
    try:
        if dialect == "sqlite":
            engine = _sqlite_engine(make_url(url).database or "", pool_size=pool_size)
        else:
            engine = _postgres_engine(
                url, pool_size=pool_size, max_overflow=0, application_name=f"jobrunner {job}"
            )
    except (ImportError, exc.NoSuchModuleError) as error:
        raise ConfigError(f"database URL {redact_url(url)!r}: driver not available ({error})") from None

    factory = sessionmaker(bind=engine)
    event.listen(factory, "after_begin", _check_owner)
    database = Database(url, engine, factory, dialect, job)
    try:
        with engine.connect():
            pass
    except exc.DBAPIError as error:
        engine.dispose()
        raise DatabaseUnavailable(
            f"cannot connect to {redact_url(url)}: {describe_error(error, url)}"
        ) from None
    return database


def _check_owner(session: Session, transaction: Any, connection: Any) -> None:
    # Enforcement of "no Session crosses threads": each session records the
    # thread that made it, and every transaction it begins is checked.
    owner = session.info.get("owner_thread")
    if owner is not None and owner != threading.get_ident():
        raise RuntimeError("a jobrunner Session was used by a thread other than its owner")


def _sqlite_engine(
    path: str, *, pool_size: int, timeout: float = SQLITE_BUSY_TIMEOUT_S, wal: bool = True
) -> Engine:
    engine = create_engine(
        f"sqlite:///{path}",
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=60,
        connect_args={"timeout": timeout, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from pysqlite: we emit BEGIN ourselves.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        if wal:
            cursor.execute("PRAGMA journal_mode = WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get(BEGIN_OPTION, "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _postgres_engine(
    url: str,
    *,
    pool_size: int,
    max_overflow: int,
    application_name: str,
    server_options: str = PG_SERVER_OPTIONS,
) -> Engine:
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=30,
        connect_args={
            **PG_KEEPALIVES,
            "application_name": application_name[:APP_NAME_MAX],
            "options": server_options,
            "connect_timeout": 10,
        },
    )


def lock_database_path(url: str, job: str) -> str:
    """``<db>.<job>.lock`` beside the SQLite database file."""
    database = make_url(url).database or ""
    return f"{database}.{job}.lock"


def describe_error(error: BaseException, url: str | None = None) -> str:
    """One line about a database error, without SQL, parameters or passwords."""
    orig = getattr(error, "orig", None) or error
    lines = [line.strip() for line in str(orig).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(orig).__name__
    text = redact_url(text)
    password = make_url(url).password if url else None
    if password:
        text = text.replace(str(password), "***")
    return text


def sqlstate(error: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE of a DBAPI error, or None."""
    orig = getattr(error, "orig", None)
    diag = getattr(orig, "diag", None)
    return getattr(diag, "sqlstate", None) or getattr(orig, "pgcode", None)


def is_sqlite_busy(error: BaseException) -> bool:
    orig = getattr(error, "orig", None)
    name = getattr(orig, "sqlite_errorname", "")
    return (
        name.startswith("SQLITE_BUSY")
        or name.startswith("SQLITE_LOCKED")
        or ("database is locked" in str(orig))
    )
