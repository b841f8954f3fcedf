"""Engines, pools and sessions for one run.

SQLite rules (measured, see docs/databases.md, "SQLite"): WAL, a 30 s busy
timeout, and ``BEGIN IMMEDIATE`` for every writing transaction. pysqlite's
default opens no transaction for a SELECT, so two workers doing
read-modify-write on one row lose an update; a plain ``BEGIN`` that later
upgrades to a write lock fails at once with SQLITE_BUSY instead of waiting.
Taking the write lock up front makes writers queue on the busy timeout. The
items reader uses a deferred BEGIN: in WAL mode it never blocks the writers.

PostgreSQL rules: item transactions run at the job's isolation level,
REPEATABLE READ unless the job says otherwise, so that a read-modify-write
that races another worker fails with 40001 (and is retried) instead of
silently losing an update. Everything else jobrunner does (the items reader,
the lock, the history) runs at READ COMMITTED, whatever the server's or the
role's default: none of it may hold a snapshot longer than a statement or
take part in serialization.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import os
import resource
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, exc, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from jobrunner import redaction
from jobrunner.config import Config
from jobrunner.exceptions import ConfigError, DatabaseUnavailable, first_line

SQLITE_BUSY_TIMEOUT_S = 30.0
BEGIN_OPTION = "jobrunner_sqlite_begin"
BEGAN_INFO = "jobrunner_began"
# Client and server keepalives both: measured on a network cut, client-side
# keepalives alone left the server backend holding the lock for minutes after
# the link came back; with the server's too it was free within a second.
PG_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
PG_SERVER_OPTIONS = "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3"
APP_NAME_MAX = 63  # PostgreSQL truncates application_name at NAMEDATALEN - 1
SQL_ISOLATION = {
    "read_committed": "READ COMMITTED",
    "repeatable_read": "REPEATABLE READ",
    "serializable": "SERIALIZABLE",
}
# The safe default per database: no lost update from a read-modify-write.
# SQLite's BEGIN IMMEDIATE serialises writers whatever the setting says.
# InnoDB's REPEATABLE READ does not stop a lost update (a plain SELECT reads a
# snapshot, and the UPDATE overwrites whatever committed since); SERIALIZABLE
# makes that SELECT take a shared lock, and the race ends in a deadlock (1213)
# that --retries retries.
DEFAULT_ISOLATION = {"postgresql": "repeatable_read", "sqlite": "serializable", "mysql": "serializable"}
# MySQL/MariaDB sessions: the server must not end a connection that sits idle
# for hours (wait_timeout), nor the lock's idle transaction (MariaDB's
# idle_*transaction_timeout).
MYSQL_IDLE_S = 365 * 24 * 3600
MARIADB_GUARD = (
    "SET SESSION idle_transaction_timeout = 0, idle_write_transaction_timeout = 0, "
    "idle_readonly_transaction_timeout = 0"
)
MYSQL_DRIVER_HINT = "install the MySQL/MariaDB driver with: pip install 'jobrunner[mysql]'"
BOOKKEEPING = "READ COMMITTED"
# Connections a run holds at most besides its workers: the items reader, the
# setup/history session, and a spare for a history write that overlaps a
# checkpoint. The guard has an engine of its own (one more connection).
EXTRA_CONNECTIONS = 3


@dataclasses.dataclass
class Database:
    """The run's engine and its one session factory."""

    url: str
    engine: Engine
    session_factory: sessionmaker[ItemSession]
    dialect: str
    job: str
    isolation: str
    name: str  # the connections' application_name (program_name on MySQL)
    _extra_engines: list[Engine] = dataclasses.field(default_factory=list)
    _probe_engine: Engine | None = None

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @property
    def family(self) -> str:
        """postgresql, sqlite or mysql (MariaDB included)."""
        return family(self.dialect)

    def session(self) -> Session:
        """A worker's session: writes, at the job's isolation level."""
        return self._owned(self.engine)

    def reader(self) -> Session:
        """A session for reading (the items reader, status): READ COMMITTED on a
        server, a deferred BEGIN on SQLite (never blocks the writers)."""
        if self.is_sqlite:
            return self._owned(self.engine.execution_options(**{BEGIN_OPTION: "DEFERRED"}))
        return self._owned(self.engine.execution_options(isolation_level=BOOKKEEPING))

    @property
    def own_engine(self) -> Any:
        """The engine for jobrunner's own work (schema, history): READ COMMITTED
        on a server, never the items' isolation (a REPEATABLE READ snapshot
        taken before waiting on a lock would not see what the holder did)."""
        if self.is_sqlite:
            return self.engine
        return self.engine.execution_options(isolation_level=BOOKKEEPING)

    def bookkeeping(self) -> Session:
        """A session for jobrunner's own rows (history, keys read at start)."""
        return self._owned(self.own_engine)

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
            return self.bookkeeping()
        engine = _sqlite_engine(sqlite_path(self.url), pool_size=1, timeout=timeout)
        self._extra_engines.append(engine)
        return self._owned(engine)

    def guard_session(self, job: str, role: str = "lock") -> Session:
        """The singleton guard's session: same factory, an engine of its own.

        Its own engine gives it its own application_name, connection options
        (no idle_in_transaction_session_timeout, READ COMMITTED) and pool, so
        invalidating a worker's pool never touches the guard's connection.
        """
        if self.is_sqlite:
            # The lock database keeps the rollback journal: nothing reads it
            # while the guard writes, and it needs no -wal/-shm files.
            engine = _sqlite_engine(lock_database_path(self.url, job), pool_size=1, timeout=0, wal=False)
        elif self.family == "mysql":
            engine = _mysql_engine(
                self.url,
                pool_size=1,
                max_overflow=0,
                name=f"jobrunner {job} {role}",
                isolation=BOOKKEEPING,
                guard=True,
            )
        else:
            engine = _postgres_engine(
                self.url,
                pool_size=1,
                max_overflow=0,
                application_name=f"jobrunner {job} {role}",
                server_options=PG_SERVER_OPTIONS + " -c idle_in_transaction_session_timeout=0",
                isolation=BOOKKEEPING,
            )
        self._extra_engines.append(engine)
        return self._owned(engine)

    def probe(self) -> None:
        """Raise unless the database answers now (a fresh connection each time)."""
        if self._probe_engine is None:
            if self.is_sqlite:
                self._probe_engine = create_engine(f"sqlite:///{sqlite_path(self.url)}", poolclass=NullPool)
            elif self.family == "mysql":
                self._probe_engine = _mysql_engine(
                    self.url, pool_size=1, max_overflow=0, name=f"jobrunner {self.job}", pool=NullPool
                )
            else:
                self._probe_engine = _postgres_engine(
                    self.url,
                    pool_size=1,
                    max_overflow=0,
                    application_name=f"jobrunner {self.job}",
                    pool=NullPool,
                )
        with self._probe_engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        for engine in (self.engine, *self._extra_engines, self._probe_engine):
            if engine is not None:
                engine.dispose()


def connection_name(job: str, *, no_lock: bool = False) -> str:
    """The application_name (MySQL: program_name) of a run's connections. A
    run without the lock names them apart: a run that takes the lock ends an
    earlier holder's open transactions (locking.end_earlier_writers), never
    those of a --no-lock run beside it."""
    return f"jobrunner {job} no-lock" if no_lock else f"jobrunner {job}"


# One --database-url serves both kinds of job: jobrunner's own work and sync
# jobs take the sync driver, async jobs the async one, whichever the URL names.
SYNC_DRIVERS = {"postgresql": "postgresql+psycopg2", "sqlite": "sqlite", "mysql": "mysql+pymysql"}
ASYNC_DRIVERS = {"postgresql": "postgresql+asyncpg", "sqlite": "sqlite+aiosqlite", "mysql": "mysql+aiomysql"}
ASYNC_DRIVER_NAMES = ("asyncpg", "aiosqlite", "aiomysql", "asyncmy", "psycopg_async")


def url_for(url: str, *, asynchronous: bool) -> str:
    """``url`` with the driver jobrunner uses for its kind of work: the named
    driver when it is of that kind, else the default one (``postgresql://``
    and ``postgresql+asyncpg://`` name one database for both)."""
    parsed = make_url(url)
    backend, driver = parsed.get_backend_name(), parsed.get_driver_name()
    if (driver in ASYNC_DRIVER_NAMES) == asynchronous and "+" in parsed.drivername:
        return url
    fam = family(backend)
    name = (ASYNC_DRIVERS if asynchronous else SYNC_DRIVERS).get(fam)
    if name is None:
        return url
    if fam == "mysql" and backend == "mariadb":
        name = "mariadb+" + name.split("+", 1)[1]
    return parsed.set(drivername=name).render_as_string(hide_password=False)


def open_database(config: Config, job: str, *, workers: int = 1, create: bool = True) -> Database:
    """Create the engine and check that the database answers.

    ``create=False`` (``history``, ``status``): a missing SQLite file is an
    error naming it; nothing is created.
    """
    url = config.database_url
    shown = redaction.redact(url)
    try:
        url = url_for(url, asynchronous=False)
        parsed = make_url(url)
        dialect = parsed.get_backend_name()
    except (exc.ArgumentError, ValueError) as error:
        raise ConfigError(f"database URL {shown!r} is malformed: {redaction.redact(str(error))}") from None
    isolation = config.isolation or DEFAULT_ISOLATION.get(dialect, "serializable")
    pool_size = workers + EXTRA_CONNECTIONS
    name = connection_name(job, no_lock=config.no_lock)
    try:
        if dialect == "sqlite":
            path = sqlite_path(url)
            check_sqlite_workers(pool_size + 1, workers, config.origin("workers"))
            check_sqlite_file(path, create=create, writes=create)
            engine = _sqlite_engine(path, pool_size=pool_size)
        elif family(dialect) == "mysql":
            engine = _mysql_engine(
                url,
                pool_size=pool_size,
                max_overflow=0,
                name=name,
                isolation=SQL_ISOLATION[isolation],
            )
        else:
            engine = _postgres_engine(
                url,
                pool_size=pool_size,
                max_overflow=0,
                application_name=name,
                isolation=SQL_ISOLATION[isolation],
            )
            if SQL_ISOLATION[isolation] != BOOKKEEPING:
                # At READ COMMITTED the items reader and jobrunner's own sessions
                # share the workers' level, so their connections would be ours
                # too: a reader left open (a generator items()) would then hold
                # an id, and VACUUM's horizon with it. Those runs keep psycopg2's
                # transactions and read the id before COMMIT.
                own_transactions(engine, SQL_ISOLATION[isolation])
    except (ImportError, exc.NoSuchModuleError) as error:
        hint = MYSQL_DRIVER_HINT if family(dialect) == "mysql" else f"driver not available ({error})"
        raise ConfigError(f"database URL {shown!r}: {hint}") from None

    factory = sessionmaker(bind=engine, class_=ItemSession)
    event.listen(factory, "after_begin", _check_owner)
    database = Database(url, engine, factory, dialect, job, isolation, name)
    try:
        # AUTOCOMMIT: no transaction, so no transaction id before the lock is
        # taken (on PostgreSQL a worker's BEGIN takes one, and the run that
        # takes the lock ends every transaction of the job's name that has one).
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            if dialect == "postgresql" and create:
                check_connection_slots(conn, pool_size + 1, workers, config.origin("workers"))
            elif family(dialect) == "mysql" and create:
                check_mysql_connections(conn, pool_size + 1, workers, config.origin("workers"))
    except exc.DBAPIError as error:
        engine.dispose()
        raise DatabaseUnavailable(f"cannot connect to {shown}: {describe_error(error)}") from None
    except BaseException:
        engine.dispose()
        raise
    return database


# Open files a SQLite connection in WAL mode holds (the database, its -wal and
# -shm files), and files kept for everything else the process opens.
SQLITE_FILES_PER_CONNECTION = 3
RESERVED_FILES = 64


def check_sqlite_workers(needed: int, workers: int, origin: str) -> None:
    """Refuse, before any thread starts, a worker count whose connections the
    process cannot open (SQLite has no server to ask, so ask the process's
    file limit): the run would fail mid-way with "unable to open database file"
    or "can't start new thread"."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return
    connections = max(1, (soft - RESERVED_FILES) // SQLITE_FILES_PER_CONNECTION)
    if needed > connections:
        most = max(1, connections - (needed - workers))
        raise ConfigError(
            f"{origin} {workers} needs {needed} SQLite connections of {SQLITE_FILES_PER_CONNECTION} open "
            f"files each, but this process may open {soft} files (ulimit -n): at most {most} workers. "
            "SQLite's writers take turns, so a few workers do as well as many: use fewer"
        )


def check_connection_slots(conn: Any, needed: int, workers: int, origin: str) -> None:
    """Refuse a run that would run out of connections mid-way.

    Exit 2 when the server (or the role, or the database) can never give
    ``needed`` connections: the configuration must change. Exit 69 when it
    could, but other clients hold the slots now: a later run may succeed.
    """
    row = conn.execute(
        text(
            "SELECT current_setting('max_connections')::int,"
            " current_setting('superuser_reserved_connections')::int,"
            " coalesce(current_setting('reserved_connections', true), '0')::int,"
            " (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),"
            " (SELECT rolconnlimit FROM pg_roles WHERE rolname = current_user),"
            " (SELECT datconnlimit FROM pg_database WHERE datname = current_database()),"
            " (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'),"
            " (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
            "   AND usename = current_user),"
            " (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
            "   AND datname = current_database())"
        )
    ).one()
    max_conn, su_reserved, reserved, is_super, role_limit, db_limit, used, used_role, used_db = row
    usable = max_conn - (0 if is_super else su_reserved + reserved)
    limits = [(usable, used, f"the server allows {usable} connections (max_connections {max_conn})")]
    if role_limit is not None and role_limit >= 0 and not is_super:
        limits.append((role_limit, used_role, f"the role's connection limit is {role_limit}"))
    if db_limit is not None and db_limit >= 0:
        limits.append((db_limit, used_db, f"the database's connection limit is {db_limit}"))
    _refuse_if_short(limits, needed, workers, origin)


def check_mysql_connections(conn: Any, needed: int, workers: int, origin: str) -> None:
    """As :func:`check_connection_slots`, for MySQL/MariaDB (one extra slot is
    kept for a SUPER user there, so the plain limit is max_connections)."""
    limit, user_limit = conn.execute(text("SELECT @@max_connections, @@max_user_connections")).one()
    used = int(conn.execute(text("SHOW STATUS LIKE 'Threads_connected'")).one()[1])
    limits = [(int(limit), used, f"the server allows {limit} connections (max_connections)")]
    if user_limit:
        limits.append((int(user_limit), used, f"max_user_connections is {user_limit}"))
    _refuse_if_short(limits, needed, workers, origin)


def _refuse_if_short(limits: list[tuple[int, int, str]], needed: int, workers: int, origin: str) -> None:
    """Each limit is (connections allowed, in use now, how to say it)."""
    # This check's own connection is one of the run's, so it is not counted twice.
    for limit, in_use, what in limits:
        if needed > limit:
            raise ConfigError(
                f"{origin} {workers} needs {needed} database connections (workers + {needed - workers} "
                f"for the items reader, bookkeeping and the lock), but {what}: use fewer workers"
            )
        free = limit - in_use + 1
        if needed > free:
            raise DatabaseUnavailable(
                f"{origin} {workers} needs {needed} database connections, but only {free} are free now "
                f"({what}, {in_use - 1} in use by other clients): try later or with fewer workers"
            )


def family(dialect: str) -> str:
    return "mysql" if dialect in ("mysql", "mariadb") else dialect


JOB_CODE = "jobrunner_job_code"  # Session.info: the job's code is running on this session
UNDONE_BY_JOB = "jobrunner_undone_by_job"  # Session.info: the job's code rolled back its work


class ItemSession(Session):
    """Every session jobrunner makes. While the job's own code runs on it (see
    :func:`job_code`), the transaction is the item's (or the chunk's), and only
    jobrunner ends it: the job's ``commit()`` flushes (its work so far becomes
    durable when jobrunner commits the item, never before), and its
    ``rollback()`` or ``close()`` undoes the work of the current transaction
    (or, in a chunk isolating a bad item, of the current part) and fails the
    item, since the rest of it is gone. So an item that commits and then
    raises leaves nothing, and a commit by job code is no way around the
    fence that jobrunner asks before every commit."""

    def commit(self) -> None:
        if self.info.get(JOB_CODE):
            self.flush()
            return
        super().commit()

    def rollback(self) -> None:
        if self.info.get(JOB_CODE):
            self.info[UNDONE_BY_JOB] = "rollback()"
            nested = self.get_nested_transaction()
            if nested is not None:
                # Only the part of a chunk jobrunner is trying, and a savepoint
                # again for whatever the job does next: jobrunner undoes the
                # part (see transaction.Unit._isolating) and fails the item.
                nested.rollback()
                self.begin_nested()
                return
        super().rollback()

    def close(self) -> None:
        if self.info.get(JOB_CODE):
            self.rollback()
            self.info[UNDONE_BY_JOB] = "close()"
            return
        super().close()


@contextlib.contextmanager
def job_code(session: Session) -> Iterator[None]:
    """The job's own code runs on ``session`` for the ``with`` block."""
    session.info[JOB_CODE] = True
    try:
        yield
    finally:
        session.info.pop(JOB_CODE, None)


def _check_owner(session: Session, transaction: Any, connection: Any) -> None:
    # Enforcement of "no Session crosses threads": each session records the
    # thread that made it, and every transaction it begins is checked.
    owner = session.info.get("owner_thread")
    if owner is not None and owner != threading.get_ident():
        raise RuntimeError("a jobrunner Session was used by a thread other than its owner")


def sqlite_path(url: str) -> str:
    return make_url(url).database or ""


def check_sqlite_file(path: str, *, create: bool, writes: bool = True) -> None:
    """Fail early, with the file or folder named, rather than deep inside SQLite
    (and before SQLite leaves -wal/-shm files beside a file it cannot use)."""
    if path.startswith("file:"):
        return  # a URI filename: SQLite decides
    file = Path(path)
    folder = file.parent
    if not folder.is_dir():
        raise ConfigError(f"SQLite database {file}: the folder {folder} does not exist")
    if not file.exists():
        if not create:
            raise ConfigError(f"SQLite database {file} does not exist (nothing has run against it yet)")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"SQLite database {file} cannot be created: the folder {folder} is read-only")
        return
    if file.is_dir():
        raise ConfigError(f"SQLite database {file} is a folder, not a file")
    if not os.access(file, os.R_OK):
        raise ConfigError(f"SQLite database {file} cannot be read (permission denied)")
    if writes:
        # The mode bits as well as access(): as root, access() says every file
        # is writable, and a file made read-only (chmod 444) would be written.
        if not os.access(file, os.W_OK) or not file.stat().st_mode & (
            stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
        ):
            raise ConfigError(f"SQLite database {file} is read-only: jobrunner needs to write to it")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(
                f"SQLite database {file}: its folder {folder} is read-only, and SQLite needs to "
                "create its -wal and -shm files (and the job's lock file) there"
            )


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
    sqlite_events(engine, timeout=timeout, wal=wal)
    return engine


def sqlite_events(engine: Engine, *, timeout: float = SQLITE_BUSY_TIMEOUT_S, wal: bool = True) -> None:
    """How every SQLite connection of jobrunner's behaves, whatever the driver
    (sqlite3, or aiosqlite's thread in front of it): WAL, a busy timeout, and
    transactions that jobrunner begins itself."""

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
        # From here a writer holds the database's one write lock (see transaction.py's watch).
        conn.info[BEGAN_INFO] = time.monotonic()


def _postgres_engine(
    url: str,
    *,
    pool_size: int,
    max_overflow: int,
    application_name: str,
    server_options: str = PG_SERVER_OPTIONS,
    isolation: str = BOOKKEEPING,
    pool: Any = None,
) -> Engine:
    return create_engine(
        url,
        isolation_level=isolation,
        connect_args={
            **PG_KEEPALIVES,
            "application_name": application_name[:APP_NAME_MAX],
            "options": server_options,
            "connect_timeout": 10,
        },
        **_pool_args(pool, pool_size, max_overflow),
    )


# InnoDB answers a deadlock by rolling back the whole transaction; the next
# statement then begins a new one, and a COMMIT would keep only what came after.
MYSQL_ROLLS_BACK_TRANSACTION = frozenset({1213})
ROLLED_BACK_INFO = "jobrunner_rolled_back"  # connection info: the server rolled its transaction back


def note_transaction_rollbacks(engine: Engine) -> None:
    """Remember on the connection an error by which MySQL rolled the whole
    transaction back, until the next transaction begins (see ``work_lost``)."""

    @event.listens_for(engine, "handle_error")
    def _noted(context: Any) -> None:
        args = getattr(context.original_exception, "args", ())
        if context.connection is not None and args and args[0] in MYSQL_ROLLS_BACK_TRANSACTION:
            context.connection.connection.info[ROLLED_BACK_INFO] = True

    @event.listens_for(engine, "begin")
    def _fresh(conn: Any) -> None:
        conn.connection.info.pop(ROLLED_BACK_INFO, None)


def transaction_connection(session: Session) -> Any:
    """The pool's proxy of the connection the session's transaction runs on
    (its ``info`` is that connection's); None while no transaction is open."""
    if not session.in_transaction():
        return None
    return session.connection().connection


def work_lost(connection: Any) -> bool:
    """The transaction on ``connection`` (see :func:`transaction_connection`)
    can no longer commit what the job did in it: a statement failed, the job
    caught the error without raising it, and the server had already given the
    transaction up. PostgreSQL then answers COMMIT by rolling back, without an
    error; MySQL would commit only what came after the error. None (no
    transaction: the item sent nothing) costs nothing here."""
    if connection is None:
        return False
    if connection.info.get(ROLLED_BACK_INFO):
        return True
    status = getattr(connection.dbapi_connection, "get_transaction_status", None)  # psycopg2's
    return status is not None and status() == PSYCOPG2_IN_ERROR


# psycopg2's transaction statuses (psycopg2.extensions), without importing it
# where another driver is in use.
PSYCOPG2_IDLE, PSYCOPG2_IN_ERROR = 0, 3
XID_INFO = "jobrunner_xid"  # connection info: the id of the transaction jobrunner began on it
STREAMED_INFO = "jobrunner_streamed"  # connection info: its transaction opened a server-side cursor
_cursor_ids = itertools.count(1)
# Statements for the next BEGIN that jobrunner sends in this thread (or
# task) to run in the same message: see begin_with.
_BEGIN_WITH: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "jobrunner_begin_with", default=None
)


def begin_with(session: Session, statement: str) -> None:
    """Begin ``session``'s transaction with ``statement`` as its first: where
    jobrunner sends BEGIN itself (:func:`own_transactions`), in BEGIN's own
    message, with no round trip of its own; elsewhere, or in a transaction
    begun already, as a statement of its own."""
    if not session.in_transaction():
        pending = [statement]
        token = _BEGIN_WITH.set(pending)
        try:
            session.connection()  # BEGIN: do_begin takes the statement if it can
        finally:
            _BEGIN_WITH.reset(token)
        if not pending:
            return
    session.execute(text(statement))


def own_transactions(engine: Engine, level: str) -> None:
    """On the items' psycopg2 connections jobrunner sends BEGIN itself
    (psycopg2 in autocommit mode), and in the same message asks the
    transaction's id: ``BEGIN ...; SELECT txid_current()``. A commit cut by a
    restart is then settled by that id (transaction.TxidCheck) without a round
    trip of its own: an item costs psycopg2's own round trips, BEGIN, the
    job's statements, COMMIT.

    The cost: every item transaction takes an id, also one that only reads
    (its COMMIT writes a record, not flushed, since it wrote nothing else), so
    ids are used up faster by read-only items; docs/outages.md says so.

    Only connections at the items' isolation level are jobrunner's; one that a
    session sets to another level (bookkeeping's READ COMMITTED, or a job's
    AUTOCOMMIT) is psycopg2's as usual until it is given back.

    psycopg2 refuses a named cursor (``yield_per``) on an autocommit
    connection unless it is WITH HOLD; inside the transaction such a cursor is
    an ordinary one, and COMMIT closes what the job left open (``CLOSE ALL``
    in the same message), so none outlives its item or is materialised."""
    dialect: Any = engine.dialect
    if dialect.driver != "psycopg2":
        return  # another driver keeps its own transactions (and the id's round trip)
    import psycopg2.extensions

    set_level, get_level = dialect.set_isolation_level, dialect.get_isolation_level
    begin = f"BEGIN ISOLATION LEVEL {level}"
    dialect.jobrunner_wants_ids = True  # see transaction_ids

    class Connection(psycopg2.extensions.connection):
        """psycopg2's connection, which can say whether jobrunner begins its transactions."""

        jobrunner_begins = False

    @event.listens_for(engine, "do_connect")
    def _factory(_dialect: Any, _record: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        kwargs["connection_factory"] = Connection

    def raw(connection: Any) -> Any:
        return getattr(connection, "dbapi_connection", connection)  # the pool's proxy, or psycopg2's

    def begins(found: Any) -> bool:
        """``found`` (psycopg2's connection) is one whose transactions jobrunner begins."""
        return bool(getattr(found, "jobrunner_begins", False) and found.autocommit)

    def ours(connection: Any) -> bool:
        return begins(raw(connection))

    def info(connection: Any) -> dict[str, Any]:
        # The pool's proxy carries the connection's info; SQLAlchemy's first
        # look at a new connection passes one that has none.
        try:
            found = connection.info if hasattr(connection, "dbapi_connection") else None
        except NotImplementedError:
            found = None
        return found if isinstance(found, dict) else {}

    def send(found: Any, statement: str, *, result: bool = True) -> Any:
        cursor = found.cursor()
        try:
            cursor.execute(statement)
            return cursor.fetchone()[0] if result and cursor.description else None
        finally:
            cursor.close()

    # Switching modes sends nothing: psycopg2 sends SET default_transaction_*
    # when given a level with autocommit, and a SET on a connection that died
    # in a restart raised outside SQLAlchemy's error handling, in the lock's
    # thread. Setting the two attributes one by one, at DEFAULT, sends nothing.
    def set_isolation_level(connection: Any, value: str) -> None:
        if value in (level, "AUTOCOMMIT"):
            connection.isolation_level = None
            connection.autocommit = True
            connection.jobrunner_begins = value == level
        else:
            connection.jobrunner_begins = False
            set_level(connection, value)

    def get_isolation_level(connection: Any) -> str:
        return level if ours(connection) else str(get_level(connection))

    # BEGIN, COMMIT and ROLLBACK run once per item: each looks its
    # connection up once.
    def do_begin(connection: Any) -> None:
        found = raw(connection)
        if begins(found):
            pending = _BEGIN_WITH.get()
            first = f"; {pending.pop()}" if pending else ""
            if dialect.jobrunner_wants_ids:
                info(connection)[XID_INFO] = send(found, f"{begin}{first}; SELECT txid_current()")
            else:
                send(found, f"{begin}{first}", result=False)

    def do_commit(connection: Any) -> None:
        notes = info(connection)
        notes.pop(XID_INFO, None)
        streamed = notes.pop(STREAMED_INFO, False)
        found = raw(connection)
        if not begins(found) or found.closed:
            connection.commit()  # psycopg2's own, and its error for a closed connection
        elif found.get_transaction_status() != PSYCOPG2_IDLE:
            send(found, "CLOSE ALL; COMMIT" if streamed else "COMMIT")

    def do_rollback(connection: Any) -> None:
        notes = info(connection)
        notes.pop(XID_INFO, None)
        notes.pop(STREAMED_INFO, None)  # ROLLBACK drops the transaction's cursors
        found = raw(connection)
        if not begins(found) or found.closed:
            connection.rollback()
        elif found.get_transaction_status() != PSYCOPG2_IDLE:
            send(found, "ROLLBACK")

    class Context(dialect.execution_ctx_cls):
        def create_server_side_cursor(self) -> Any:
            if not ours(self._dbapi_connection):
                return super().create_server_side_cursor()
            info(self._dbapi_connection)[STREAMED_INFO] = True
            name = f"c_{id(self):x}_{next(_cursor_ids):x}"
            return raw(self._dbapi_connection).cursor(name, withhold=True)

    dialect.execution_ctx_cls = Context
    dialect.set_isolation_level, dialect.get_isolation_level = set_isolation_level, get_isolation_level
    dialect.do_begin, dialect.do_commit, dialect.do_rollback = do_begin, do_commit, do_rollback


def transaction_ids(engine: Engine, *, wanted: bool) -> None:
    """Whether the items' BEGIN asks for the transaction's id (see
    :func:`own_transactions`). Only a run that settles a commit cut by a
    restart by that id needs it: resume keys settle one by themselves. Asking
    costs a statement in every item's BEGIN (BENCHMARKS.md, section 16), so
    such runs do not ask."""
    dialect: Any = engine.dialect
    if hasattr(dialect, "jobrunner_wants_ids"):
        dialect.jobrunner_wants_ids = wanted


def _pool_args(pool: Any, pool_size: int, max_overflow: int) -> dict[str, Any]:
    """A given pool class (NullPool, for probes), or a sized queue pool."""
    if pool is not None:
        return {"poolclass": pool}
    return {"pool_size": pool_size, "max_overflow": max_overflow, "pool_timeout": 30}


def _mysql_engine(
    url: str,
    *,
    pool_size: int,
    max_overflow: int,
    name: str,
    isolation: str = BOOKKEEPING,
    guard: bool = False,
    pool: Any = None,
) -> Engine:
    """PyMySQL. Connections name themselves (program_name, in
    performance_schema.session_connect_attrs) and opt out of the server's idle
    timeouts: a worker's pooled connection may idle for hours, and the lock's
    transaction idles for the whole run."""
    engine = create_engine(
        url,
        isolation_level=isolation,
        connect_args={"program_name": name[:APP_NAME_MAX], "connect_timeout": 10},
        **_pool_args(pool, pool_size, max_overflow),
    )

    mysql_events(engine, guard=guard)
    return engine


def mysql_events(engine: Engine, *, guard: bool = False) -> None:
    """Every MySQL/MariaDB connection of jobrunner's, PyMySQL or aiomysql."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"SET SESSION wait_timeout = {MYSQL_IDLE_S}, interactive_timeout = {MYSQL_IDLE_S}")
        if guard and "mariadb" in dbapi_connection.get_server_info().lower():
            cursor.execute(MARIADB_GUARD)
        cursor.close()

    note_transaction_rollbacks(engine)


def lock_database_path(url: str, job: str) -> str:
    """``<db>.<job>.lock`` beside the SQLite database file."""
    return f"{sqlite_path(url)}.{job}.lock"


# insufficient_privilege; MySQL: table access denied, database access denied.
PRIVILEGE_SQLSTATES = {"42501"}
PRIVILEGE_MYSQL_CODES = {1142, 1044}


def refused_or_unavailable(what: str, error: BaseException, url: str | None = None) -> Exception:
    """A database error where jobrunner's own tables are read or written: a
    missing privilege is a configuration error (exit 2: trying again later
    will not help), anything else the database being unavailable (69)."""
    from jobrunner.outage import mysql_code, sqlstate

    line = describe_error(error, url)
    if sqlstate(error) in PRIVILEGE_SQLSTATES or mysql_code(error) in PRIVILEGE_MYSQL_CODES:
        return ConfigError(
            f"{what}: {line}: the database user needs SELECT, INSERT, UPDATE and DELETE on jobrunner's "
            "tables (jobrunner_*), and CREATE where they do not exist yet, e.g. "
            "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO <user> (PostgreSQL) or "
            "GRANT SELECT, INSERT, UPDATE, DELETE ON <database>.* TO <user> (MySQL)"
        )
    return DatabaseUnavailable(f"{what}: {line}")


def describe_error(error: BaseException, url: str | None = None) -> str:
    """One line about a database error, without SQL, parameters or passwords
    (``url``'s password is registered first, so it is masked wherever it is)."""
    if url:
        redaction.register(url)
    return first_line(error)
