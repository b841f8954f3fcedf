"""A dry run that tells the truth: everything in one transaction, rolled back.

A real run commits ``setup()``, then each chunk of items, and later items see
what earlier ones did. A dry run that rolled each of those back on its own
would run the items against a database without ``setup()``'s effects, and
report failures (or successes) that a real run would not have. So a dry run
opens one connection and one transaction, runs ``setup()``, ``items()`` and
every chunk in it, each chunk in a savepoint (released when it succeeds,
rolled back when it fails, exactly as a real run would commit or roll back),
and rolls the whole transaction back at the end.

The price: one connection, so items run one at a time in this thread
(``--workers`` does not apply), and the transaction holds the locks of every
row it changes until the end (on SQLite, the database's write lock).

It is the one run of ``runner.py`` in the role ``roles.Rehearsal``: this
module supplies its sessions (:class:`OneTransaction`), its feed
(:class:`SerialFeed`, no threads) and its change report (PostgreSQL's own
counts, or each statement's rowcount elsewhere), counted only for chunks
that ended well.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.orm import Session

from jobrunner import db as dbmod
from jobrunner import tables
from jobrunner.exceptions import CannotUndo
from jobrunner.feed import Entry

_DDL = re.compile(r"^\s*(create|alter|drop|truncate|rename)\b", re.I)
_CREATE_IF_MISSING = re.compile(r"^\s*create\s+table\s+if\s+not\s+exists\s+[`\"]?([\w$]+)[`\"]?", re.I)
_DML = re.compile(r"^\s*(insert\s+(?:or\s+\w+\s+)?into|update|delete\s+from)\s+[`\"]?([\w.]+)[`\"]?", re.I)


class ChangeCounter:
    """Counts the rows a dry run's statements report, per table and kind.

    Counts gather per thread and join the totals only when the savepoint they
    belong to ends well: a failed item's rows would not have changed. This is
    what SQLite and MySQL can tell: each statement's rowcount, by its kind
    (see :class:`ServerCounts` for PostgreSQL, which counts for itself).
    """

    def __init__(self, engine: Any) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, int]] = {}
        self._pending = threading.local()
        self._engine = engine
        event.listen(engine, "after_cursor_execute", self._after_execute)

    def close(self) -> None:
        event.remove(self._engine, "after_cursor_execute", self._after_execute)

    def _after_execute(
        self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        kind, table = self._classify(statement, context)
        if kind is None or table is None or table.startswith(tables.PREFIX):
            return
        rows = cursor.rowcount
        if rows is None or rows < 0:
            rows = len(parameters) if executemany else 0
        if rows > 0:
            self._add(table, kind, rows)

    def _add(self, table: str, kind: str, rows: int) -> None:
        pending = self._pending.__dict__.setdefault("counts", [])
        pending.append((table, kind, rows))

    def start(self, session: Any) -> None:
        """A chunk (or setup()) begins on ``session``."""
        self._pending.__dict__.pop("counts", None)

    def keep(self, session: Any = None) -> None:
        """The calling thread's savepoint ended well: count its rows."""
        pending = self._pending.__dict__.pop("counts", [])
        with self._lock:
            for table, kind, rows in pending:
                counts = self._counts.setdefault(table, {"insert": 0, "update": 0, "delete": 0})
                counts[kind] += rows

    def discard(self) -> None:
        self._pending.__dict__.pop("counts", None)

    def mark(self, session: Any) -> Any:
        """Where the calling thread's pending counts stand (for :meth:`rewind`)."""
        return len(self._pending.__dict__.get("counts", []))

    def rewind(self, session: Any, mark: Any) -> None:
        """A savepoint inside the chunk was rolled back: forget what it counted."""
        pending = self._pending.__dict__.get("counts")
        if pending is not None:
            del pending[mark:]

    @staticmethod
    def _classify(statement: str, context: Any) -> tuple[str | None, str | None]:
        compiled = getattr(context, "compiled", None)
        target = getattr(getattr(compiled, "statement", None), "table", None)
        name = getattr(target, "name", None)
        if context is not None and name is not None:
            for kind in ("insert", "update", "delete"):
                if getattr(context, f"is{kind}", False):
                    return kind, name
        match = _DML.match(statement)
        if match is None:
            return None, None
        verb = match.group(1).split()[0].lower()
        return verb, match.group(2).split(".")[-1]

    def report(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {table: dict(counts) for table, counts in sorted(self._counts.items())}


_XACT_COUNTS = text(
    "SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_xact_user_tables "
    "WHERE n_tup_ins + n_tup_upd + n_tup_del > 0"
)


class ServerCounts(ChangeCounter):
    """PostgreSQL counts the rows its current transaction inserted, updated and
    deleted, per table (pg_stat_xact_user_tables): an upsert that updated
    counts as an update, and triggers, cascades, MERGE and data-modifying
    CTEs count too, as the real run will do them. Rows of a rolled-back
    savepoint still count there, so the counts are read around each chunk
    (and each part tried when a chunk isolates a bad item): what a part that
    was undone added is subtracted."""

    def __init__(self, engine: Any) -> None:
        self._lock = threading.Lock()
        self._counts = {}
        self._pending = threading.local()

    def close(self) -> None:
        pass

    @staticmethod
    def _read(session: Any) -> dict[tuple[str, str], int]:
        rows = session.execute(_XACT_COUNTS).all()
        out: dict[tuple[str, str], int] = {}
        for table, inserted, updated, deleted in rows:
            if table.startswith(tables.PREFIX):
                continue
            out[(table, "insert")], out[(table, "update")], out[(table, "delete")] = (
                inserted,
                updated,
                deleted,
            )
        return out

    def start(self, session: Any) -> None:
        state = self._pending.__dict__
        state["start"], state["undone"] = self._read(session), {}

    def mark(self, session: Any) -> Any:
        return self._read(session)

    def rewind(self, session: Any, mark: Any) -> None:
        undone = self._pending.__dict__.setdefault("undone", {})
        for key, value in _delta(self._read(session), mark).items():
            undone[key] = undone.get(key, 0) + value

    def keep(self, session: Any = None) -> None:
        state = self._pending.__dict__
        start, undone = state.pop("start", None), state.pop("undone", {})
        if start is None or session is None:
            return
        with self._lock:
            for (table, kind), rows in _delta(self._read(session), start).items():
                rows -= undone.get((table, kind), 0)
                if rows > 0:
                    counts = self._counts.setdefault(table, {"insert": 0, "update": 0, "delete": 0})
                    counts[kind] += rows

    def discard(self) -> None:
        self._pending.__dict__.pop("start", None)
        self._pending.__dict__.pop("undone", None)


def _delta(now: dict[tuple[str, str], int], then: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    return {key: value - then.get(key, 0) for key, value in now.items() if value != then.get(key, 0)}


def counter_for(database: Any) -> ChangeCounter:
    """The best change report each database can give (see docs/dry-runs-and-retries.md)."""
    if database.family == "postgresql":
        return ServerCounts(database.engine)
    return ChangeCounter(database.engine)


def refuse_ddl(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> tuple[str, Any]:
    """MySQL commits DDL at once, with everything before it, even a CREATE TABLE
    IF NOT EXISTS of a table that exists. That one is skipped (it would do
    nothing but commit); any other DDL ends the dry run before it runs."""
    if not _DDL.match(statement):
        return statement, parameters
    missing = _CREATE_IF_MISSING.match(statement)
    if missing is not None:
        cursor.execute(
            "SELECT count(*) FROM information_schema.tables "
            "WHERE table_schema = DATABASE() AND table_name = %s",
            (missing.group(1),),
        )
        if cursor.fetchone()[0]:
            return "SELECT 1", ()
    words = " ".join(statement.split()[:4])
    raise CannotUndo(
        f"a dry run on MySQL/MariaDB cannot undo DDL ({words} ...), which the server commits at once, "
        "together with everything before it: run the job once for real (or create its tables) first"
    )


class OneTransaction:
    """The dry run's sessions: every one on one connection, inside one
    transaction that is rolled back at the end; each session's own
    transaction is a savepoint (released when a chunk or setup() ends well,
    rolled back when it fails), as a real run would commit or roll back."""

    def __init__(self, database: dbmod.Database) -> None:
        self.database = database
        self._connection: Any = None
        self._outer: Any = None

    def __enter__(self) -> OneTransaction:
        database = self.database
        # READ COMMITTED on a server: one long transaction at REPEATABLE READ would
        # see a snapshot from its start and fail on rows that others changed since.
        engine = (
            database.engine
            if database.is_sqlite
            else database.engine.execution_options(isolation_level=dbmod.BOOKKEEPING)
        )
        self._connection = engine.connect()
        if database.family == "mysql":
            event.listen(self._connection, "before_cursor_execute", refuse_ddl, retval=True)
        self._outer = self._connection.begin()
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._outer.rollback()
        finally:
            self._connection.close()

    def session(self) -> Session:
        session = self.database.session_factory(
            bind=self._connection, join_transaction_mode="create_savepoint"
        )
        session.info["owner_thread"] = threading.get_ident()
        return session

    reader = session


class SerialFeed:
    """The dry run's feed: items go from items() straight to the unit of
    work, chunk by chunk, in this thread, on one session of the one
    transaction (so items see what earlier items did, as they run)."""

    claims_in_transaction = False

    def __init__(self, sessions: OneTransaction, batch_size: int, stop: threading.Event) -> None:
        self.sessions = sessions
        self.batch_size = batch_size
        self.stop = stop
        self.unit: Callable[[Session, list[Entry]], None] | None = None

    def feed_in(self, items: Iterable[Any], accept: Callable[[Any], bool], alive: Callable[[], bool]) -> None:
        assert self.unit is not None, "the unit of work is attached first"
        with self.sessions.session() as work:
            stream = ((item, None) for item in items if accept(item))
            while not self.stop.is_set() and (chunk := list(islice(stream, self.batch_size))):
                self.unit(work, chunk)

    def finish(self, consumers: int) -> None:
        pass

    def take(self, session: Any, limit: int) -> list[Entry] | None:
        return None

    def reclaim(self, session: Any, chunk: list[Entry]) -> list[Entry]:
        return chunk

    def settle_failure(self, token: Any, item: Any, item_repr: str, error_line: str) -> bool:
        return True

    def record_failures(
        self, session: Any, failures: list[tuple[Any, Any, str, str]], *, whole: bool = False
    ) -> None:
        pass
