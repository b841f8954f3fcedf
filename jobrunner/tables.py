"""jobrunner's own tables. Every name starts with ``jobrunner_`` so that a
dry-run's change report can leave them out."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    exc,
    func,
    inspect,
    literal_column,
    select,
    text,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection, Engine

from jobrunner.config import Config
from jobrunner.db import BEGIN_OPTION, Database, open_database, refused_or_unavailable

PREFIX = "jobrunner_"
# Serialises schema creation between first runs on PostgreSQL, where two
# concurrent CREATE TABLE IF NOT EXISTS can both fail on pg_type.
SCHEMA_LOCK_KEY = 0x6A6F6272756E6E  # "jobrunn"

metadata = MetaData()
# Microseconds on MySQL too (its DATETIME keeps whole seconds unless told).
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

# One row per job: the row the guard locks FOR UPDATE NOWAIT.
locks = Table(
    "jobrunner_locks",
    metadata,
    Column("job", String(200), primary_key=True),
)

# Who holds a job's lock. Written in its own committed transaction once the
# lock is held: a loser cannot see the holder's uncommitted writes, and the
# holder cannot update its own locked row from another transaction.
lock_holders = Table(
    "jobrunner_lock_holders",
    metadata,
    Column("job", String(200), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("since", Timestamp, nullable=False),  # naive UTC
)

runs = Table(
    "jobrunner_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job", String(200), nullable=False, index=True),
    Column("status", String(20), nullable=False),
    Column("dry_run", Boolean, nullable=False, default=False),
    Column("started_at", Timestamp, nullable=False),  # naive UTC
    Column("finished_at", Timestamp),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("workers", Integer, nullable=False),
    Column("succeeded", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("retried", Integer, nullable=False, default=0),
    Column("skipped", Integer, nullable=False, default=0),
    Column("error", Text),
    Column("resumed_from", Integer),
    # Added later: nullable, so that ensure_schema can add them to old tables.
    Column("commits", Integer),
    Column("replayed", Integer),
    Column("rolled_back", Integer),
    Column("batch_size", Integer),
    Column("lock", String(20)),  # row, advisory, file, or none (--no-lock)
    Column("checkpoint_at", Timestamp),  # naive UTC; the counts are current as of then
    # A distributed run (see worktable.py): whether helpers may join, what the
    # leader has fed to the work table, and why it asks its helpers to stop.
    Column("accepts_helpers", Boolean),
    Column("fed", BigInteger),
    Column("fed_all", Boolean),
    Column("stop_requested", Text),
    # The leader's lock connection, "pid@backend_start": helpers may commit
    # only while it is alive (a dead or replaced lock connection ends the run).
    Column("leader_backend", String(100)),
)

# The keys of items that committed, for --resume. Written in the item's own
# transaction, so the key and the item's changes commit or roll back together.
item_keys = Table(
    "jobrunner_item_keys",
    metadata,
    Column("run_id", Integer, primary_key=True),
    Column("key", String(500), primary_key=True),
)


# The items of a distributed run, fed by its leader and claimed by every
# process FOR UPDATE SKIP LOCKED in the same transaction as their work: a row
# is deleted by the commit that did its item, or returns with a rollback.
work = Table(
    "jobrunner_work",
    metadata,
    Column("run_id", Integer, primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("item", Text, nullable=False),  # JSON, see worktable.encode
    Column("key", String(500)),  # item_key(item), when the job has one (for --resume)
)
# Claims read one lane (seq modulo 64, see worktable.LANES) in seq order.
Index("jobrunner_work_lanes", work.c.run_id, work.c.seq % literal_column("64"), work.c.seq).ddl_if(
    dialect="postgresql"  # distributed runs are PostgreSQL's; MariaDB has no index on an expression
)

# Items of a distributed run that failed alone: recorded, with their work
# row deleted, in one transaction, by the process that replayed them.
failures = Table(
    "jobrunner_failures",
    metadata,
    Column("run_id", Integer, primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("item", Text, nullable=False),  # repr, as in --json's failures
    Column("payload", Text),  # the item as it travelled, so that --resume can redo it
    Column("error", Text, nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
)

# Every process that worked on a distributed run: the leader and its helpers.
run_processes = Table(
    "jobrunner_run_processes",
    metadata,
    Column("run_id", Integer, primary_key=True),
    Column("host", String(255), primary_key=True),
    Column("pid", Integer, primary_key=True, autoincrement=False),
    Column("role", String(20), nullable=False),  # leader or helper
    Column("started_at", Timestamp, nullable=False),
    Column("checkpoint_at", Timestamp),
    Column("finished_at", Timestamp),
    Column("status", String(20), nullable=False),
    Column("workers", Integer, nullable=False),
    Column("succeeded", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("retried", Integer, nullable=False, default=0),
    Column("replayed", Integer, nullable=False, default=0),
    Column("rolled_back", Integer, nullable=False, default=0),
    Column("commits", Integer, nullable=False, default=0),
)

# A distributed run's committed chunks, counted by each chunk's own transaction
# (in the statement of its claim), one row per database connection so that no
# two open transactions update one row: the run's commits are known whoever
# dies, where a process's own counts (above) end at its last checkpoint.
chunk_commits = Table(
    "jobrunner_chunk_commits",
    metadata,
    Column("run_id", Integer, primary_key=True),
    Column("backend", Integer, primary_key=True, autoincrement=False),  # pg_backend_pid()
    Column("commits", BigInteger, nullable=False),
)


def _missing(conn: Connection) -> tuple[set[str], dict[str, list[Column]]]:
    inspector = inspect(conn)
    tables = set(inspector.get_table_names())
    columns: dict[str, list[Column]] = {}
    for name, table in metadata.tables.items():
        if name in tables:
            have = {c["name"] for c in inspector.get_columns(name)}
            absent = [c for c in table.columns if c.name not in have]
            if absent:
                columns[name] = absent
    return set(metadata.tables) - tables, columns


def ensure_schema(engine: Engine) -> None:
    """Create jobrunner's tables, and add the columns newer versions need.
    ``engine`` must run at READ COMMITTED on a server (``Database.own_engine``)."""
    # Look before taking a write lock: on SQLite a writing transaction queues
    # behind a running job's workers, and a second copy must fail fast.
    reader = engine.execution_options(**{BEGIN_OPTION: "DEFERRED"})
    with reader.connect() as conn:
        tables, columns = _missing(conn)
    if not tables and not columns:
        return
    with engine.begin() as conn:
        mysql = conn.dialect.name in ("mysql", "mariadb")
        if conn.dialect.name == "postgresql":
            conn.execute(select(func.pg_advisory_xact_lock(SCHEMA_LOCK_KEY)))
        elif mysql:  # a session lock: MySQL commits DDL at once, so no transaction holds it
            conn.execute(text("SELECT GET_LOCK('jobrunner-schema', 60)"))
        try:
            metadata.create_all(conn, checkfirst=True)
            _, columns = _missing(conn)
            quote = conn.dialect.identifier_preparer.quote
            for table, absent in columns.items():
                for column in absent:
                    kind = column.type.compile(dialect=conn.dialect)
                    conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {quote(column.name)} {kind}"))
        finally:
            if mysql:
                conn.execute(text("SELECT RELEASE_LOCK('jobrunner-schema')"))


def has_schema(database: Database) -> bool:
    """True if jobrunner has run against this database: its runs table exists.
    Read-only commands never create jobrunner's tables on a database it has
    never run against; on one it has, they add the tables and columns that a
    newer jobrunner needs, as a run would."""
    with database.engine.execution_options(**{BEGIN_OPTION: "DEFERRED"}).connect() as conn:
        tables, columns = _missing(conn)
    if runs.name in tables:
        return False
    if tables or columns:
        ensure_schema(database.own_engine)
    return True


@contextlib.contextmanager
def ready_database(config: Config, job: str, *, workers: int = 1) -> Iterator[Database]:
    """The database, connected and holding jobrunner's tables; disposed after."""
    database = open_database(config, job, workers=workers)
    try:
        try:
            ensure_schema(database.own_engine)
        except exc.DBAPIError as error:
            raise refused_or_unavailable("cannot create jobrunner's tables", error, database.url) from None
        yield database
    finally:
        database.dispose()


@contextlib.contextmanager
def existing_database(config: Config, job: str) -> Iterator[Database | None]:
    """For commands that only read: the database, or None if jobrunner has never
    run against it. Creates nothing: no file, no table."""
    database = open_database(config, job, create=False)
    try:
        try:
            ready = has_schema(database)
        except exc.DBAPIError as error:
            raise refused_or_unavailable("cannot read the database", error) from None
        yield database if ready else None
    finally:
        database.dispose()
