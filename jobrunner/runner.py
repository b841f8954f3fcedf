"""One run of one job: load it, connect, take the lock, set up, fan the items
out over the workers, and hand one :class:`RunResult` to the reporter."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import event, exc
from sqlalchemy.orm import Session

from jobrunner import db as dbmod
from jobrunner import history, jobs, tables
from jobrunner.config import Config
from jobrunner.context import JobContext
from jobrunner.exceptions import ConfigError, JobError, LockHeld
from jobrunner.executor import FanOut
from jobrunner.locking import Guard
from jobrunner.result import MAX_FAILURES_LISTED, ItemFailure, RunResult, Status

log = logging.getLogger("jobrunner")
TRANSIENT_SQLSTATES = {"40001", "40P01"}  # serialization_failure, deadlock_detected
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 5.0


class Reporter(Protocol):
    """What the runner tells the operator's side (see ``report.py``)."""

    def started(self, job: str, *, total: int | None, progress: Progress) -> None: ...
    def notice(self, text: str) -> None: ...
    def finished(self, result: RunResult) -> None: ...


class Progress:
    """Counts shared by the workers; the reporter reads ``snapshot()``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.succeeded = self.failed = self.retried = self.skipped = self.cancelled = 0
        self.failures: list[ItemFailure] = []
        self.total: int | None = None

    def success(self, retries: int) -> None:
        with self._lock:
            self.succeeded += 1
            self.retried += retries

    def failure(self, item: Any, error: BaseException, retries: int) -> int:
        with self._lock:
            self.failed += 1
            self.retried += retries
            if len(self.failures) < MAX_FAILURES_LISTED:
                self.failures.append(ItemFailure(_safe_repr(item), error_line(error)))
            return self.failed

    def cancel(self, retries: int) -> None:
        with self._lock:
            self.cancelled += 1
            self.retried += retries

    def skip(self, count: int = 1) -> None:
        with self._lock:
            self.skipped += count

    def snapshot(self) -> dict[str, int | None]:
        with self._lock:
            return {
                "succeeded": self.succeeded,
                "failed": self.failed,
                "retried": self.retried,
                "skipped": self.skipped,
                "done": self.succeeded + self.failed,
                "total": self.total,
            }


class _NullReporter:
    def started(self, job: str, *, total: int | None, progress: Progress) -> None:
        pass

    def notice(self, text: str) -> None:
        log.warning(text)

    def finished(self, result: RunResult) -> None:
        pass


def run(config: Config, reporter: Reporter | None = None) -> RunResult:
    """Run ``config.job`` and return its result (the reporter is told as it goes)."""
    if config.job is None:
        raise ConfigError("no job given")
    job = jobs.load(config.jobs_path, config.job)
    if config.resume and job.item_key is None:
        raise JobError(f"--resume: job {job.name!r} defines no item_key(item), so it cannot be resumed")
    with tables.ready_database(config, job.name, workers=config.workers) as database:
        active = _Run(config, job, database, reporter or _NullReporter())
        result = active.execute()
    _write_metrics(config, result, active.reporter)
    if active.abandoned:
        # Workers outlived --shutdown-timeout. The result is printed; leave
        # now, so the database rolls back whatever they still hold open.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(result.exit_code)
    return result


def _write_metrics(config: Config, result: RunResult, reporter: Reporter) -> None:
    path = config.metrics_path
    if path is None:
        return
    from jobrunner import metrics

    try:
        metrics.update(path, result)
    except OSError as error:
        reporter.notice(f"cannot write the metrics file {path}: {error.strerror or error}")


class _Run:
    def __init__(self, config: Config, job: jobs.Job, database: dbmod.Database, reporter: Reporter):
        self.config = config
        self.job = job
        self.database = database
        self.reporter = reporter
        self.progress = Progress()
        self.stop = threading.Event()
        self.stop_reason: Status | None = None
        self.error: str | None = None
        self.signal: int | None = None
        self.no_more_commits = threading.Event()
        self.abandoned = False
        self.guard: Guard | None = None
        self.changes = ChangeCounter(database.engine) if config.dry_run else None
        self.recorder = history.RunRecorder(database, job.name, reporter.notice)
        self.run_id: int | None = None
        self.resumed_from: int | None = None
        self.skip_keys: set[str] = set()
        self.ctx = JobContext(
            job=job.name,
            dry_run=config.dry_run,
            params=dict(config.params),
            log=logging.getLogger(f"jobrunner.job.{job.name}"),
            stopping=self.stop,
        )

    # -- orchestration --------------------------------------------------------
    def execute(self) -> RunResult:
        started_at = datetime.now(UTC)
        t0 = time.monotonic()
        try:
            with self._guard():
                self._open_history()
                with self._signals():
                    self._run_locked()
                result = self._result(started_at, t0)
                # Before the lock is released: the next run must not find
                # this one still 'running' and mark it crashed.
                self.recorder.finish(result, patient=not self.abandoned)
        except LockHeld as held:
            result = RunResult(
                job=self.job.name,
                status=Status.LOCKED,
                dry_run=self.config.dry_run,
                started_at=started_at,
                finished_at=datetime.now(UTC),
                duration_seconds=time.monotonic() - t0,
                workers=self.config.workers,
                error=str(held),
                holder=held.holder,
            )
        self.reporter.finished(result)
        return result

    def _result(self, started_at: datetime, t0: float) -> RunResult:
        snap = self.progress
        return RunResult(
            job=self.job.name,
            status=self._status(),
            dry_run=self.config.dry_run,
            succeeded=snap.succeeded,
            failed=snap.failed,
            retried=snap.retried,
            skipped=snap.skipped,
            started_at=started_at,
            finished_at=datetime.now(UTC),
            duration_seconds=time.monotonic() - t0,
            workers=self.config.workers,
            failures=tuple(snap.failures),
            changes=self.changes.report() if self.changes else {},
            error=self._error_text(),
            signal=self.signal,
            run_id=self.run_id,
            resumed_from=self.resumed_from,
        )

    def _error_text(self) -> str | None:
        rolled_back = self.progress.cancelled
        if self.error is None or not rolled_back:
            return self.error
        return f"{self.error} ({rolled_back} finished items were rolled back, not committed)"

    def _open_history(self) -> None:
        """Runs once the lock is held (or without one, under --no-lock)."""
        if not self.config.no_lock:
            crashed = self.recorder.mark_crashed()
            if crashed:
                self.reporter.notice(f"marked {crashed} earlier run(s) of {self.job.name} as crashed")
        if self.config.resume:
            latest, chain = history.resume_point(self.database, self.job.name, before=None)
            if latest is None:
                self.reporter.notice(f"nothing to resume: the latest run of {self.job.name} finished")
            else:
                self.skip_keys = history.committed_keys(self.database, chain)
                self.resumed_from = latest
                self.reporter.notice(
                    f"resuming run {latest}: {len(self.skip_keys)} items already committed are skipped"
                )
        self.run_id = self.recorder.start(
            dry_run=self.config.dry_run, workers=self.config.workers, resumed_from=self.resumed_from
        )
        if self.job.item_key is not None and self.run_id is None and not self.config.dry_run:
            self.reporter.notice("item keys cannot be recorded without a history row: --resume will not skip")

    def _guard(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.no_lock:
            return contextlib.nullcontext()
        self.guard = Guard(
            self.database,
            self.job.name,
            mode=self.config.lock,
            wait=self.config.wait_lock,
            heartbeat=self.config.heartbeat,
            on_lost=self._lock_lost,
        )
        return self.guard

    @property
    def record_keys(self) -> bool:
        return self.job.item_key is not None and self.run_id is not None and not self.config.dry_run

    def _run_locked(self) -> None:
        try:
            if self.job.setup is not None:
                with self.database.session() as session:
                    self.job.setup(self.ctx, session)
                    self._end_transaction(session)
        except Exception as error:  # noqa: BLE001 - the job's own code
            self._fail_run(f"setup() raised {error_line(error)}", error)
            return

        with self.database.session(read_only=True) as items_session:
            try:
                items = self.job.items(self.ctx, items_session)
                self.progress.total = self._total(items, items_session)
            except Exception as error:  # noqa: BLE001 - the job's own code
                self._fail_run(f"items() raised {error_line(error)}", error)
                return
            self.reporter.started(self.job.name, total=self.progress.total, progress=self.progress)
            fan_out = FanOut(
                workers=self.config.workers,
                open_session=self.database.session,
                close_session=Session.close,
                work=self._work,
                stop=self.stop,
                thread_name=f"jobrunner-{self.job.name}",
            )
            finished = fan_out.run(self._produce(items), drain_timeout=self.config.shutdown_timeout)
            if fan_out.producer_error is not None:
                error = fan_out.producer_error
                self._fail_run(f"items() raised {error_line(error)}", error)
            if not finished:
                self.no_more_commits.set()
                self.abandoned = True
                self.reporter.notice(
                    f"in-flight items did not finish within {self.config.shutdown_timeout:g}s "
                    "of the stop: they are rolled back"
                )

    def _total(self, items: Any, session: Session) -> int | None:
        if hasattr(items, "__len__"):
            return len(items)
        if self.job.count is not None:
            return int(self.job.count(self.ctx, session))
        return None

    def _produce(self, items: Iterable[Any]) -> Iterator[Any]:
        skip, key_of = self.skip_keys, self.job.item_key
        for item in items:
            if skip and key_of is not None and str(key_of(item)) in skip:
                self.progress.skip()
                continue
            if getattr(type(item), "_sa_class_manager", None) is not None:
                # An ORM instance belongs to the items session, which lives in
                # this thread; a worker must never touch it.
                raise TypeError(
                    f"items() yielded an ORM instance ({type(item).__name__}); yield its "
                    "primary key or a plain tuple instead, since ORM objects cannot cross threads"
                )
            yield item

    def _status(self) -> Status:
        if self.stop_reason is not None:
            return self.stop_reason
        if self.error is not None or self.progress.failed:
            return Status.FAILED
        return Status.SUCCEEDED

    # -- one item, in a worker thread -------------------------------------------
    def _work(self, session: Session, item: Any) -> None:
        attempt = 0
        while True:
            attempt += 1
            try:
                self.job.process(self.ctx, session, item)
                if self.record_keys:
                    # In the item's own transaction: the key commits with the work.
                    history.record_key(session, self.run_id, str(self.job.item_key(item)))
                if not self._end_transaction(session):
                    self.progress.cancel(attempt - 1)
                    return
                self.progress.success(attempt - 1)
                return
            except Exception as error:  # noqa: BLE001 - the job's own code
                _rollback(session)
                if self.changes is not None:
                    self.changes.discard()
                if attempt <= self.config.retries and self._may_commit() and self._is_transient(error):
                    log.info("item %s: retrying after %s", _safe_repr(item), error_line(error))
                    time.sleep(_backoff(attempt))
                    continue
                self._item_failed(item, error, attempt - 1)
                return

    def _end_transaction(self, session: Session) -> bool:
        """Commit (or, in a dry run, flush and roll back). False if the run may
        no longer commit, in which case the work is rolled back."""
        if self.config.dry_run:
            session.flush()  # the database checks constraints and counts the rows
            session.rollback()
            if self.changes is not None:
                self.changes.keep()
            return True
        if not self._may_commit():
            session.rollback()
            return False
        session.commit()
        return True

    def _may_commit(self) -> bool:
        if self.no_more_commits.is_set():
            return False
        return self.guard is None or self.guard.check()

    def _is_transient(self, error: BaseException) -> bool:
        for link in _chain(error):
            if isinstance(link, exc.DBAPIError):
                if link.connection_invalidated or dbmod.sqlstate(link) in TRANSIENT_SQLSTATES:
                    return True
                if self.database.is_sqlite and dbmod.is_sqlite_busy(link):
                    return True
        return False

    def _item_failed(self, item: Any, error: BaseException, retries: int) -> None:
        failed = self.progress.failure(item, error, retries)
        log.error("item %s failed: %s", _safe_repr(item), error_line(error), exc_info=error)
        limit = self.config.max_failures
        if limit is not None and failed > limit and not self.stop.is_set():
            self._stop(Status.ABORTED, f"aborted: more than {limit} items failed")

    # -- stopping ------------------------------------------------------------------
    def _stop(self, reason: Status, message: str) -> None:
        if self.stop_reason is None or reason is Status.LOCK_LOST:
            self.stop_reason = reason
            self.error = message
        self.stop.set()

    def _fail_run(self, message: str, error: BaseException) -> None:
        log.error("%s", message, exc_info=error)
        if self.error is None:
            self.error = message

    def _lock_lost(self, reason: str) -> None:
        self._stop(Status.LOCK_LOST, f"lock lost: {reason}; nothing commits after this")

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_signal(signum: int, _frame: Any) -> None:
            if self.signal is not None:
                # A second signal: leave at once; the database rolls back.
                os._exit(128 + signum)
            self.signal = signum
            name = signal.Signals(signum).name
            self._stop(Status.INTERRUPTED, f"interrupted by {name}")
            self.reporter.notice(
                f"{name} received: finishing in-flight items (up to "
                f"{self.config.shutdown_timeout:g}s); send it again to exit at once"
            )

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


_DML = re.compile(r"^\s*(insert\s+(?:or\s+\w+\s+)?into|update|delete\s+from)\s+\"?([\w.]+)\"?", re.I)


class ChangeCounter:
    """Counts the rows a dry run's statements report, per table and kind.

    Counts gather per thread and join the totals only when the transaction
    they belong to ends well: a failed item's rows would not have changed.
    """

    def __init__(self, engine: Any) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, int]] = {}
        self._pending = threading.local()
        event.listen(engine, "after_cursor_execute", self._after_execute)

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
            pending = self._pending.__dict__.setdefault("counts", [])
            pending.append((table, kind, rows))

    def keep(self) -> None:
        """The calling thread's transaction ended well: count its rows."""
        pending = self._pending.__dict__.pop("counts", [])
        with self._lock:
            for table, kind, rows in pending:
                counts = self._counts.setdefault(table, {"insert": 0, "update": 0, "delete": 0})
                counts[kind] += rows

    def discard(self) -> None:
        self._pending.__dict__.pop("counts", None)

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


def error_line(error: BaseException) -> str:
    """``ExceptionType: message`` on one line, without SQL or parameters."""
    if isinstance(error, exc.DBAPIError) and error.orig is not None:
        return f"{type(error.orig).__name__}: {dbmod.describe_error(error)}"
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _rollback(session: Session) -> None:
    try:
        session.rollback()
    except Exception:
        log.debug("rollback failed", exc_info=True)


def _backoff(attempt: int) -> float:
    return min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def _safe_repr(item: Any) -> str:
    try:
        text = repr(item)
    except Exception:  # noqa: BLE001
        text = f"<{type(item).__name__} (repr failed)>"
    return text if len(text) <= 200 else text[:197] + "..."
