"""One run of one job: load it, connect, take the lock, set up, fan the items
out over the workers, and hand one :class:`RunResult` to the reporter.

This module only orchestrates. The pieces it puts together live apart:
``transaction.py`` (one chunk of items in one transaction), ``feed.py`` (how
items reach the workers), ``executor.py`` (the threads), ``locking.py`` (the
lock and the fence), ``outage.py`` (waiting out the database), ``stop.py``
(why a run stops), ``dryrun.py`` (the one-transaction dry run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy.orm import Session

from jobrunner import db as dbmod
from jobrunner import dryrun, history, jobs, paging, tables
from jobrunner.config import Config
from jobrunner.context import JobContext
from jobrunner.exceptions import ConfigError, JobError, LockHeld
from jobrunner.executor import Workers
from jobrunner.feed import MemoryFeed, produce
from jobrunner.locking import Guard, RunFence
from jobrunner.outage import Kind, Outage, classify
from jobrunner.progress import Progress
from jobrunner.result import RunResult, Status, error_line, safe_repr
from jobrunner.stop import Stop
from jobrunner.transaction import SLOW_SQLITE_HOLD_S, Unit

log = logging.getLogger("jobrunner")
TICK_S = 0.2


class Reporter(Protocol):
    """What the runner tells the operator's side (see ``report.py``)."""

    def phase(self, text: str) -> None: ...
    def started(self, job: str, *, total: int | None, progress: Progress, run_id: int | None) -> None: ...
    def notice(self, text: str) -> None: ...
    def finished(self, result: RunResult) -> None: ...


class _NullReporter:
    def phase(self, text: str) -> None:
        pass

    def started(self, job: str, *, total: int | None, progress: Progress, run_id: int | None) -> None:
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
    config = config.with_job_defaults(job.defaults, str(job.path))
    if config.resume and job.item_key is None:
        raise JobError(f"--resume: job {job.name!r} defines no item_key(item), so it cannot be resumed")
    reporter = reporter or _NullReporter()
    with tables.ready_database(config, job.name, workers=config.workers) as database:
        active = _Run(config, job, database, reporter)
        result = active.execute()
    _write_metrics(config, result, reporter)
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
        self.stop = Stop()
        self.error: str | None = None  # setup() or items() raised: the run failed
        self.abandoned = False
        self.outage = Outage(
            database.probe,
            config.outage_timeout,
            on_timeout=lambda message: self.stop.set(Status.UNAVAILABLE, message),
            notice=reporter.notice,
            stopped=self.stop.is_set,
        )
        recorder_outage = Outage(database.probe, config.outage_timeout)
        self.recorder = history.RunRecorder(database, job.name, reporter.notice, recorder_outage)
        self.guard: Guard | None = None
        self.fence = RunFence(None, self.stop)
        self.changes: dryrun.ChangeCounter | None = None
        self.run_id: int | None = None
        self.resumed_from: int | None = None
        self.skip_keys: set[str] = set()
        self.warned_sqlite = False
        self.ctx = JobContext(
            job=job.name,
            dry_run=config.dry_run,
            params=dict(config.params),
            log=logging.getLogger(f"jobrunner.job.{job.name}"),
            stopping=self.stop.event,
        )

    # -- orchestration --------------------------------------------------------
    def execute(self) -> RunResult:
        started_at, t0 = datetime.now(UTC), time.monotonic()
        try:
            with self._guard():
                self._open_history()
                with self._signals():
                    if self.config.dry_run:
                        self._dry_run()
                    elif self._setup():
                        self._fan_out()
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
                batch_size=self.config.batch_size,
                error=str(held),
                holder=held.holder,
            )
        self.reporter.finished(result)
        return result

    def _guard(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.no_lock:
            return contextlib.nullcontext()
        self.reporter.phase("waiting for the lock" if self.config.wait_lock else "taking the lock")
        self.guard = Guard(
            self.database,
            self.job.name,
            mode=self.config.lock,
            wait=self.config.wait_lock,
            heartbeat=self.config.heartbeat,
            on_lost=lambda reason: self.stop.set(
                Status.LOCK_LOST, f"lock lost: {reason}; nothing commits after this"
            ),
            may_retake=lambda: self.run_id is not None and self.recorder.still_ours(),
            retake_within=self.config.outage_timeout,
            notice=self.reporter.notice,
        )
        self.fence = RunFence(self.guard, self.stop)
        return self.guard

    def _open_history(self) -> None:
        """Runs once the lock is held (or without one, under --no-lock)."""
        crashed = self.recorder.mark_crashed(holding_lock=not self.config.no_lock)
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
        lock = "none" if self.config.no_lock else self.guard.mode if self.guard else "none"
        self.run_id = self.recorder.start(
            dry_run=self.config.dry_run,
            workers=self.config.workers,
            batch_size=self.config.batch_size,
            lock=lock,
            resumed_from=self.resumed_from,
        )
        self.ctx = dataclasses.replace(self.ctx, run_id=self.run_id)
        if self.job.item_key is not None and self.run_id is None and not self.config.dry_run:
            self.reporter.notice("item keys cannot be recorded without a history row: --resume will not skip")

    def _setup(self) -> bool:
        if self.job.setup is None:
            return True
        self.reporter.phase("setting up")
        while True:
            try:
                with self.database.session() as session:
                    self.job.setup(self.ctx, session)
                    session.commit()
                return True
            except Exception as error:  # noqa: BLE001 - the job's own code
                if classify(error) is Kind.GONE and self.outage.wait(error):
                    continue
                self._failed("setup()", error)
                return False

    def _fan_out(self) -> None:
        size = self.config.batch_size
        feed = MemoryFeed(self.config.workers * size, self.stop.event)
        workers = Workers(
            workers=self.config.workers,
            open_session=self.database.session,
            close_session=Session.close,
            take=lambda session: feed.take(session, size),
            work=self._unit(feed),
            pause=lambda: not self.outage.active or self.outage.wait(),
            thread_name=f"jobrunner-{self.job.name}",
        )
        workers.start()
        producer = threading.Thread(
            target=self._produce, args=(feed, workers), name=f"jobrunner-{self.job.name}-items", daemon=True
        )
        producer.start()
        self._supervise(workers)
        producer.join(timeout=1.0)

    def _produce(self, feed: MemoryFeed, workers: Workers) -> None:
        """The producer thread: items() with a reader session of its own."""
        try:
            with self.database.reader() as session:
                session.info[paging.OUTAGE_INFO] = self.outage  # paged() waits out outages too
                items = self.job.items(self.ctx, session)
                self._started(items, session)
                produce(feed, items, accept=self._accept, alive=workers.alive)
        except Exception as error:  # noqa: BLE001 - the job's own code
            self._failed("items()", error)
        finally:
            feed.close(workers.count)

    def _supervise(self, workers: Workers) -> None:
        """The main thread while workers work: checkpoints, and the shutdown timeout."""
        stopped_at: float | None = None
        next_checkpoint = time.monotonic() + history.CHECKPOINT_S
        while not workers.wait(TICK_S):
            now = time.monotonic()
            if now >= next_checkpoint and not self.outage.active:
                self.recorder.checkpoint(self.progress.snapshot())
                next_checkpoint = now + history.CHECKPOINT_S
            if self.stop.is_set():
                stopped_at = stopped_at or now
                if now - stopped_at > self.config.shutdown_timeout:
                    self.fence.closed.set()
                    self.abandoned = True
                    self.reporter.notice(
                        f"in-flight items did not finish within {self.config.shutdown_timeout:g}s "
                        "of the stop: they are rolled back"
                    )
                    return

    def _dry_run(self) -> None:
        self.changes = dryrun.ChangeCounter(self.database.engine)
        try:
            dryrun.run(
                database=self.database,
                job=self.job,
                ctx=self.ctx,
                unit=self._unit(dryrun.SERIAL),
                changes=self.changes,
                accept=self._accept,
                batch_size=self.config.batch_size,
                stop=self.stop.event,
                started=self._started,
                failed=self._failed,
            )
        finally:
            self.changes.close()

    def _unit(self, feed: Any) -> Unit:
        keys = None
        if self.job.item_key is not None and self.run_id is not None and not self.config.dry_run:
            keys = history.KeyRecorder(self.run_id, self.job.item_key)
        watch = self.database.is_sqlite and self.config.workers > 1 and not self.config.dry_run
        return Unit(
            job=self.job,
            ctx=self.ctx,
            feed=feed,
            fence=self.fence,
            outage=self.outage,
            stop=self.stop,
            progress=self.progress,
            retries=self.config.retries,
            keys=keys,
            on_failure=self._item_failed,
            changes=self.changes,
            watch_sqlite_lock=self._watch_sqlite if watch else None,
        )

    # -- items ------------------------------------------------------------------
    def _started(self, items: Any, session: Session) -> None:
        if hasattr(items, "__len__"):
            self.progress.total = len(items)
        elif self.job.count is not None:
            self.progress.total = int(self.job.count(self.ctx, session))
        self.reporter.started(
            self.job.name, total=self.progress.total, progress=self.progress, run_id=self.run_id
        )

    def _accept(self, item: Any) -> bool:
        if self.skip_keys and str(self.job.item_key(item)) in self.skip_keys:
            self.progress.skip()
            return False
        if getattr(type(item), "_sa_class_manager", None) is not None:
            # An ORM instance belongs to the items session, which lives in the
            # producer thread; a worker must never touch it.
            raise TypeError(
                f"items() yielded an ORM instance ({type(item).__name__}); yield its "
                "primary key or a plain tuple instead, since ORM objects cannot cross threads"
            )
        return True

    # -- outcomes -----------------------------------------------------------------
    def _item_failed(self, item: Any, error: BaseException) -> None:
        shown, line = safe_repr(item), error_line(error)
        failed = self.progress.failure(shown, line)
        log.error("item %s failed: %s", shown, line, exc_info=error)
        limit = self.config.max_failures
        if limit is not None and failed > limit:
            self.stop.set(Status.ABORTED, f"aborted: more than {limit} items failed")

    def _failed(self, what: str, error: BaseException) -> None:
        """setup() or items() raised: the run fails (exit 1), or, if the
        database went away under it, stops as unavailable (exit 69)."""
        if classify(error) is Kind.GONE:
            message = f"the database went away while {what} ran: {error_line(error)}"
            self.stop.set(Status.UNAVAILABLE, message)
        else:
            message = f"{what} raised {error_line(error)}"
            self.error = self.error or message
        log.error("%s", message, exc_info=error)

    def _watch_sqlite(self, held: float) -> None:
        if held > SLOW_SQLITE_HOLD_S and not self.warned_sqlite:
            self.warned_sqlite = True
            self.reporter.notice(
                f"an item held SQLite's write lock for {held:.2f}s, so the other workers waited: on "
                "SQLite, items run one at a time from their first statement to their commit. Do slow "
                "work that needs no database in prepare() (see the README's SQLite section)"
            )

    def _result(self, started_at: datetime, t0: float) -> RunResult:
        snap = self.progress.snapshot()
        return RunResult(
            job=self.job.name,
            status=self.stop.reason or (Status.FAILED if self.error or snap["failed"] else Status.SUCCEEDED),
            dry_run=self.config.dry_run,
            **{key: snap[key] for key in history.COUNTS},
            started_at=started_at,
            finished_at=datetime.now(UTC),
            duration_seconds=time.monotonic() - t0,
            items_seconds=self.progress.items_seconds(),
            workers=1 if self.config.dry_run else self.config.workers,
            batch_size=self.config.batch_size,
            failures=tuple(self.progress.failures),
            changes=self.changes.report() if self.changes else {},
            error=self._error_text(snap["rolled_back"]),
            signal=self.stop.signal,
            run_id=self.run_id,
            resumed_from=self.resumed_from,
        )

    def _error_text(self, rolled_back: int) -> str | None:
        message = self.stop.message or self.error
        if message is None or not rolled_back:
            return message
        return f"{message} ({rolled_back} finished items were rolled back, not committed)"

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_signal(signum: int, _frame: Any) -> None:
            if self.stop.signal is not None:
                # A second signal: leave at once; the database rolls back.
                os._exit(128 + signum)
            name = signal.Signals(signum).name
            self.stop.set(Status.INTERRUPTED, f"interrupted by {name}", signum=signum)
            self.stop.signal = signum
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
