"""Is this error the item's fault, a transient conflict, or the database gone?
And waiting out the database's absence, within a bound.

One classifier serves the workers, the guard, ``items()``, setup and the
history writes, so every part of a run answers "transient or not" and
"database gone or not" the same way.

Measured on PostgreSQL 15: errors raised while connecting carry
no SQLSTATE, only libpq's message ("Connection refused", "the database
system is shutting down", "... is starting up", "... not yet accepting
connections"); a connection dropped mid-session is flagged
``connection_invalidated``; an administrator's shutdown of a live session is
57P01.
"""

from __future__ import annotations

import enum
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator

from sqlalchemy import exc

from jobrunner.exceptions import first_line

log = logging.getLogger("jobrunner")

# PostgreSQL: serialization_failure, deadlock_detected.
# MySQL/MariaDB: ER_LOCK_DEADLOCK, ER_LOCK_WAIT_TIMEOUT.
TRANSIENT_SQLSTATES = {"40001", "40P01"}
LOCK_NOT_AVAILABLE = "55P03"  # lock_timeout ran out (or NOWAIT found the row locked)
TRANSIENT_MYSQL_CODES = {1213, 1205}
# admin_shutdown, crash_shutdown, cannot_connect_now, too_many_connections;
# class 08 (connection_exception) is matched by prefix.
GONE_SQLSTATES = {"57P01", "57P02", "57P03", "53300"}
# CR_SERVER_GONE_ERROR, CR_SERVER_LOST, CR_CONN_HOST_ERROR, CR_CONNECTION_ERROR,
# ER_CON_COUNT_ERROR, ER_SERVER_SHUTDOWN, ER_CONNECTION_KILLED, CR_SERVER_LOST_EXTENDED
GONE_MYSQL_CODES = {2006, 2013, 2003, 2002, 1040, 1053, 1927, 2055, 4031}
GONE_MESSAGES = (
    "connection refused",
    "could not connect to server",
    "server closed the connection unexpectedly",
    "the database system is shutting down",
    "the database system is starting up",
    "the database system is not yet accepting connections",
    "the database system is in recovery mode",
    "terminating connection due to administrator command",
    "no connection to the server",
    "connection already closed",
    "could not receive data from server",
    "could not send data to server",
    "ssl syscall error",
    "connection timed out",
    "timeout expired",
    "no route to host",
    "network is unreachable",
    "remaining connection slots are reserved",
    "too many clients already",
    "lost connection to",
    "server has gone away",
)
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 5.0
PROBE_FIRST_S = 0.1
PROBE_CAP_S = 2.0


class Kind(enum.Enum):
    FATAL = "fatal"  # the item's own fault (or a bug): fail it
    TRANSIENT = "transient"  # a conflict: retry the item, counting against --retries
    GONE = "gone"  # the database is unreachable: wait for it, then redo


def chain(error: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE of a DBAPI error (PostgreSQL), or None."""
    orig = getattr(error, "orig", None)
    diag = getattr(orig, "diag", None)
    return getattr(diag, "sqlstate", None) or getattr(orig, "pgcode", None)


def mysql_code(error: BaseException) -> int | None:
    orig = getattr(error, "orig", None)
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int) and type(orig).__module__.startswith(("pymysql", "MySQLdb")):
        return args[0]
    return None


def is_sqlite_busy(error: BaseException) -> bool:
    orig = getattr(error, "orig", None)
    name = getattr(orig, "sqlite_errorname", "") or ""
    return (
        name.startswith("SQLITE_BUSY")
        or name.startswith("SQLITE_LOCKED")
        or "database is locked" in str(orig)
    )


def is_deadlock(error: BaseException) -> bool:
    """The database broke a deadlock by failing this transaction (PostgreSQL
    40P01, MySQL 1213): the chunk's lock order crossed another's."""
    return any(
        sqlstate(link) == "40P01" or mysql_code(link) == 1213
        for link in chain(error)
        if isinstance(link, exc.DBAPIError)
    )


def timed_out_waiting(error: BaseException) -> bool:
    """PostgreSQL gave up waiting for a lock (55P03: lock_timeout, or NOWAIT)."""
    links = (link for link in chain(error) if isinstance(link, exc.DBAPIError))
    return any(sqlstate(link) == LOCK_NOT_AVAILABLE for link in links)


def classify(error: BaseException, *, bounded_wait: bool = False) -> Kind:
    """The one answer to "what kind of failure is this?" for the whole run.
    ``bounded_wait``: the transaction ran under jobrunner's own lock_timeout
    (attempt.ChunkSize.bounded_wait), so running out of it (55P03) is a
    conflict; the job's own NOWAIT or lock_timeout stays its own error."""
    for link in chain(error):
        if isinstance(link, (exc.TimeoutError, exc.PendingRollbackError)):
            return Kind.FATAL  # a pool too small, or a job misusing its session: never retried
        if not isinstance(link, exc.DBAPIError):
            continue
        state = sqlstate(link)
        code = mysql_code(link)
        if state in TRANSIENT_SQLSTATES or code in TRANSIENT_MYSQL_CODES or is_sqlite_busy(link):
            return Kind.TRANSIENT
        if bounded_wait and state == LOCK_NOT_AVAILABLE:
            return Kind.TRANSIENT
        if link.connection_invalidated or state in GONE_SQLSTATES or (state or "").startswith("08"):
            return Kind.GONE
        if code in GONE_MYSQL_CODES:
            return Kind.GONE
        if state is None and isinstance(link, (exc.OperationalError, exc.InterfaceError)):
            message = str(link.orig).lower()
            if any(fragment in message for fragment in GONE_MESSAGES):
                return Kind.GONE
    return Kind.FATAL


def backoff(attempt: int) -> float:
    """Seconds before retry ``attempt`` (1-based): exponential, capped, jittered."""
    return min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


class Outage:
    """Waits out the database's absence for every thread of a run.

    The first thread to find the database gone opens an episode; the threads
    that follow join it. One of them at a time probes the database with
    backoff. When a probe answers, every waiter carries on. When the episode
    has lasted ``timeout`` seconds, every waiter gets False and ``on_timeout``
    is called once: the run stops (exit 69).
    """

    def __init__(
        self,
        probe: Callable[[], None],
        timeout: float,
        *,
        on_timeout: Callable[[str], object] | None = None,
        notice: Callable[[str], None] | None = None,
        stopped: Callable[[], bool] = lambda: False,
    ) -> None:
        self.probe = probe
        self.timeout = timeout
        self.on_timeout = on_timeout
        self.notice = notice
        self.stopped = stopped
        self._cond = threading.Condition()
        self._since: float | None = None  # start of the current episode
        self._probing = False
        self._gave_up = False
        self._reason = ""
        self.episodes = 0
        self.longest = 0.0

    @property
    def active(self) -> bool:
        return self._since is not None

    @property
    def gave_up(self) -> bool:
        return self._gave_up

    def wait(self, error: BaseException | None = None) -> bool:
        """Block until the database answers (True) or the bound passes (False)."""
        with self._cond:
            if self._gave_up:
                return False
            if self._since is None:
                self._since = time.monotonic()
                self._reason = first_line(error) if error is not None else "no answer"
                self.episodes += 1
                if self.notice:
                    self.notice(
                        f"the database is unreachable ({self._reason}): waiting up to "
                        f"{self.timeout:g}s for it to come back"
                    )
            episode = self._since
        delay = PROBE_FIRST_S
        while True:
            with self._cond:
                if self._gave_up:
                    return False
                if self._since != episode:
                    return True  # another thread saw it come back
                if self._probing:
                    self._cond.wait(0.2)
                    continue
                self._probing = True
            answered = self._probe_once()
            with self._cond:
                self._probing = False
                if self._since != episode:
                    self._cond.notify_all()
                    return not self._gave_up
                waited = time.monotonic() - episode
                if answered:
                    self._since = None
                    self.longest = max(self.longest, waited)
                    self._cond.notify_all()
                    if self.notice:
                        self.notice(f"the database is back after {waited:.1f}s: carrying on")
                    return True
                if waited >= self.timeout or self.stopped():
                    self._gave_up = True
                    self._cond.notify_all()
                    message = (
                        f"the database was unreachable for {waited:.1f}s, longer than "
                        f"--outage-timeout {self.timeout:g}s ({self._reason})"
                    )
                    if self.on_timeout is not None and not self.stopped():
                        self.on_timeout(message)
                    return False
                pause = min(delay, max(0.0, self.timeout - waited))
                self._cond.wait(pause)
                delay = min(PROBE_CAP_S, delay * 2)

    def _probe_once(self) -> bool:
        try:
            self.probe()
            return True
        except Exception as error:
            if classify(error) is not Kind.GONE:
                log.debug("outage probe failed with a non-connection error", exc_info=error)
            return False
