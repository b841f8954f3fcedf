"""One run of one job: load it, connect, take the lock, set up, fan the items
out over the workers, and hand one :class:`RunResult` to the reporter.

There is one run, whatever the process is: a role (``roles.py``) supplies
what differs between a single process, a distributed run's leader, a helper
and a dry run. This module only orchestrates. The pieces it puts together
live apart: ``transaction.py`` (one chunk of items in one transaction, the
decisions of ``attempt.py`` carried out), ``feed.py`` and ``worktable.py``
(how items reach the workers), ``executor.py`` (the threads), ``locking.py``
(the lock and the fence), ``outage.py`` (waiting out the database),
``stop.py`` (why a run stops), ``dryrun.py`` (the dry run's one transaction).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from jobrunner import appcode, distributed, dryrun, history, jobs, paging, roles, tables
from jobrunner import db as dbmod
from jobrunner.config import Config
from jobrunner.context import JobContext
from jobrunner.counters import Counters
from jobrunner.exceptions import (
    ConfigError,
    DatabaseUnavailable,
    HelpersRemain,
    JobError,
    LockHeld,
    WorkerCrashed,
    error_line,
)
from jobrunner.executor import Executor, in_this_thread
from jobrunner.feed import Feed, ItemFilter, MemoryFeed
from jobrunner.locking import RunFence, _Heartbeat
from jobrunner.outage import Kind, Outage, classify
from jobrunner.result import COUNTS, RunResult, Status, safe_repr
from jobrunner.stop import Stop, catch_signals
from jobrunner.transaction import SqliteLockWatch, TxidCheck, Unit

log = logging.getLogger("jobrunner")
TICK_S = 0.2


class Reporter(Protocol):
    """What the runner tells the operator's side: ``report.BaseReporter`` and
    its plain and terminal forms implement it; with no reporter, the log."""

    def phase(self, text: str) -> None: ...
    def started(
        self, job: str, *, total: int | None, progress: Counters, run_id: int | None, role: str | None = None
    ) -> None: ...
    def notice(self, text: str) -> None: ...
    def info(self, text: str) -> None: ...
    def finished(self, result: RunResult, *, terminal: bool = True) -> None: ...


class _NullReporter:
    def phase(self, text: str) -> None:
        pass

    def started(
        self, job: str, *, total: int | None, progress: Counters, run_id: int | None, role: str | None = None
    ) -> None:
        pass

    def notice(self, text: str) -> None:
        log.warning(text)

    def info(self, text: str) -> None:
        log.info(text)

    def finished(self, result: RunResult, *, terminal: bool = True) -> None:
        pass


def run(config: Config, reporter: Reporter | None = None) -> RunResult:
    """Run ``config.job`` and return its result (the reporter is told as it goes)."""
    if config.job is None:
        raise ConfigError("no job given")
    job = jobs.load(config.jobs_path, config.job)
    config = config.with_job_defaults(job.defaults, str(job.path))
    app = appcode.AppCode.of(job)
    if job.is_async:
        _check_async(config, app)
    elif app is not None:
        app.check(config.database_url)
    if config.resume and job.item_key is None:
        raise JobError(
            f"{config.origin('resume')}: job {job.name!r} defines no item_key(item), so it cannot be resumed"
        )
    reporter = reporter or _NullReporter()
    if config.distributed and config.dry_run:
        reporter.notice("a dry run is one transaction in one process: --processes and --join do not apply")
        config = dataclasses.replace(config, processes=1, join=False)
    if config.distributed and config.no_lock:
        raise ConfigError(
            "a distributed run is led by the holder of the job's lock: --no-lock does not apply"
        )
    if config.distributed:
        distributed.check_supported(config)
    with tables.ready_database(config, job.name, workers=config.workers) as database:
        active = _Run(config, job, database, reporter, roles.for_config(config))
        result = active.execute()
        if result.status is Status.LOCKED and config.join and not active.helpers_remain:
            run_id, accepts = distributed.joinable_run(database, job.name)
            if run_id is not None and accepts:
                active = _Run(config, job, database, reporter, roles.Helping(run_id))
                result = active.execute()
            elif run_id is not None:
                result = dataclasses.replace(
                    result,
                    error=f"{result.error}; run {run_id} takes no helpers: hosts share a run only when "
                    "every start is a --join start (or join = true)",
                )
    if active.config_error is not None:
        raise active.config_error
    reporter.finished(result)
    if result.role != "helper":
        _write_metrics(config, result, reporter, crashed=active.recorder.crashed)
    if active.abandoned:
        leave_now(result.exit_code)
    return result


def _check_async(config: Config, app: Any) -> None:
    """An async job: what it needs installed, and what its registry must be."""
    from jobrunner import aio

    try:
        family = dbmod.family(make_url(config.database_url).get_backend_name())
    except Exception:  # noqa: BLE001 - a malformed URL is said where the database is opened
        family = ""
    aio.require(family)
    if app is not None:
        if app.registry is not None and not app.is_async:
            raise ConfigError(
                "an async job's SCOPED_SESSION must be an async_scoped_session "
                "(scopefunc=asyncio.current_task)"
            )
        app.check(config.database_url)


def help_run(
    config: Config, job: jobs.Job, database: dbmod.Database, reporter: Reporter, run_id: int
) -> tuple[RunResult, bool]:
    """Help run ``run_id`` (led by another process) until its items are done:
    its result, and whether workers were abandoned at --shutdown-timeout."""
    active = _Run(config, job, database, reporter, roles.Helping(run_id))
    result = active.execute()
    return result, active.abandoned


def leave_now(code: int) -> None:
    """Workers outlived --shutdown-timeout. The result is printed; leave now,
    so the database rolls back whatever they still hold open."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _write_metrics(
    config: Config, result: RunResult, reporter: Reporter, crashed: list[dict[str, int]] | None = None
) -> None:
    path = config.metrics_path
    if path is None:
        return
    from jobrunner import metrics

    try:
        metrics.update(path, result, crashed=crashed or [])
    except OSError as error:
        reporter.notice(f"cannot write the metrics file {path}: {error.strerror or error}")


class _Run:
    """One run of one job in this process; ``role`` supplies what differs
    between a single process, a distributed run's leader and a helper."""

    def __init__(
        self, config: Config, job: jobs.Job, database: dbmod.Database, reporter: Reporter, role: roles.Single
    ):
        self.config, self.job, self.database, self.reporter = config, job, database, reporter
        self.role = role
        self.app = appcode.AppCode.of(job)  # SCOPED_SESSION, APP_CONTEXT
        self.progress = Counters()
        self.stop = Stop()
        self.error: str | None = None  # setup() or items() raised: the run failed
        self.abandoned = False
        self.result: RunResult | None = None
        self._began = (datetime.now(UTC), time.monotonic())
        self.outage = Outage(
            database.probe,
            config.outage_timeout,
            on_timeout=lambda message: self.stop.set(Status.UNAVAILABLE, message),
            notice=reporter.notice,
            stopped=self.stop.is_set,
        )
        self.recorder = history.RunRecorder(
            database, job.name, reporter.notice, Outage(database.probe, config.outage_timeout)
        )
        self.guard: _Heartbeat | None = None
        self.fence = RunFence(None, self.stop)
        self.feed: Feed = MemoryFeed(1, self.stop.event)  # the role's, once the items start
        self.sessions: Any = database  # the role's, while setup and items run
        self.loop: Any = None  # an async job's aio.EventLoop, while the run holds the lock
        self.async_database: Any = None  # and its aio.AsyncDatabase
        self.changes: dryrun.ChangeCounter | None = None
        self.opening = history.Opening(None, None, frozenset())
        self.keys: history.KeyRecorder | None = None  # resume keys, once the run is open
        self.commit_check: TxidCheck | None = None
        self.checkpoints = history.Checkpoints(self.recorder, self.progress, by_workers=database.is_sqlite)
        self.helpers_remain = False
        self.config_error: ConfigError | None = None  # items() yielded an item that cannot travel
        self.ctx = JobContext(
            job=job.name,
            dry_run=config.dry_run,
            params=dict(config.params),
            log=logging.getLogger(f"jobrunner.job.{job.name}"),
            stopping=self.stop.event,
        )
        role.bind(self)

    def execute(self) -> RunResult:
        started_at, t0 = datetime.now(UTC), time.monotonic()
        self._began = (started_at, t0)
        try:
            with self._hold():
                self.role.open()
                self.ctx = dataclasses.replace(self.ctx, run_id=self.opening.run_id)
                self.keys, self.commit_check = self._settling()
                # Before setup: only a run that settles by the id asks for it.
                dbmod.transaction_ids(self.database.engine, wanted=self.commit_check is not None)
                signals = catch_signals(
                    self.stop, self.reporter.notice, self.config.shutdown_timeout, leaving=self._leaving
                )
                with (
                    signals,
                    self._asyncio(),
                    self._counting_changes(),
                    self._app_installed(),
                    self.role.sessions() as self.sessions,
                ):
                    if self._setup():
                        self._fan_out()
                result = self._result(started_at, t0)
                self.role.close(result)
        except LockHeld as held:
            self.helpers_remain = isinstance(held, HelpersRemain)
            duration = time.monotonic() - t0
            result = RunResult.locked(
                self.job.name, held, started_at=started_at, duration=duration, config=self.config
            )
        return result

    @contextlib.contextmanager
    def _asyncio(self) -> Iterator[None]:
        """An async job's event loop and async engine, for its setup and items."""
        if not self.job.is_async:
            yield
            return
        from jobrunner import aio

        self.loop = aio.EventLoop(self.reporter.notice, self.job.path)
        try:
            self.async_database = aio.AsyncDatabase(
                self.database, self.config.database_url, self.config.workers, self.loop
            )
            self.job = aio.adapt(self.job, self.loop, self.app)
            try:
                yield
            finally:
                if not self.abandoned:
                    self.async_database.dispose()
        finally:
            if not self.abandoned:
                self.loop.close()

    def _app_installed(self) -> contextlib.AbstractContextManager[Any]:
        return self.app.installed() if self.app is not None else contextlib.nullcontext()

    def in_thread(self) -> contextlib.AbstractContextManager[Any]:
        """The job's APP_CONTEXT, for a thread that runs job code (an async
        job's is entered in the task that runs it: see in_task)."""
        if self.app is None or self.job.is_async:
            return contextlib.nullcontext()
        return self.app.thread()

    def in_task(self) -> contextlib.AbstractContextManager[Any]:
        """The job's APP_CONTEXT, for an asyncio task that runs an async job's code."""
        if self.app is None:
            return contextlib.nullcontext()
        return self.app.task()

    def in_hook(self, session: Any) -> contextlib.AbstractContextManager[Any]:
        """The job's SCOPED_SESSION returns ``session`` while a hook runs on it."""
        if self.app is None or self.job.is_async:
            return contextlib.nullcontext()
        return self.app.hook(session)

    @contextlib.contextmanager
    def _counting_changes(self) -> Iterator[None]:
        """A dry run counts what it would have changed (see ``dryrun.py``)."""
        if not self.config.dry_run:
            yield
            return
        self.changes = dryrun.counter_for(self.async_database or self.database)
        try:
            yield
        finally:
            self.changes.close()

    def _leaving(self) -> None:
        """A second signal: the process leaves at once, in-flight items to the
        database's rollback. Record that, if it can be done in time."""
        try:
            self.progress.abandon()
            self.abandoned = True  # the record's writes must not wait on the workers
            self.role.close(self._result(*self._began))
        except Exception:
            log.debug("cannot record the run's end on the way out", exc_info=True)

    def _hold(self) -> contextlib.AbstractContextManager[Any]:
        """The right to commit, for the whole run: the job's lock, or a helper's fence."""
        held = self.role.hold()
        if isinstance(held, _Heartbeat):
            self.guard = held
            self.fence = RunFence(held, self.stop)
        return held

    def _setup(self) -> bool:
        if self.job.setup is None or not self.role.sets_up:
            return True
        self.reporter.phase("setting up")
        if self.loop is not None:
            return bool(self.loop.call(self._set_up))
        return self._set_up()

    def _set_up(self) -> bool:
        assert self.job.setup is not None
        while True:
            try:
                with self.sessions.session() as session:
                    if self.changes is not None:
                        self.changes.start(session)
                    with self.in_thread(), self.in_hook(session), dbmod.job_code(session):
                        self.job.setup(self.ctx, session)
                    session.commit()
                    if self.changes is not None:
                        self.changes.keep(session)
                return True
            except Exception as error:  # noqa: BLE001 - the job's own code
                if self.changes is not None:
                    self.changes.discard()
                # (On an async job's loop, waited in a thread: the loop is not blocked.)
                wait = self.loop.blocking if self.loop is not None else in_this_thread
                if classify(error) is Kind.GONE and wait(self.outage.wait, error):
                    continue
                self._failed("setup()", error)
                return False

    def _fan_out(self) -> None:
        self.feed = feed = self.role.feed()
        unit = self._unit(feed)
        workers = self.role.executor(unit, feed)

        def produce_items() -> None:  # the producer thread, with a reader session of its own
            try:
                substitute = self.role.substitute_items()
                if substitute is not None:  # a resumed run that had fed everything
                    self._started(substitute, None)
                    return
                with self.in_thread(), self.sessions.reader() as session, self.in_hook(session):
                    session.info[paging.OUTAGE_INFO] = self.outage  # paged() waits out outages too
                    items = self.job.items(self.ctx, session)
                    self._started(items, session)
                    feed.feed_in(items, self._filter(), workers.alive)
            except Exception as error:  # noqa: BLE001 - the job's own code
                self._failed("items()", error)
            finally:
                try:
                    feed.finish(workers.count)
                except Exception as error:  # noqa: BLE001 - a thread's error must reach the run
                    self._failed("the end of feeding", error)

        try:
            workers.start(produce_items if self.role.sets_up else None)
        except WorkerCrashed:
            # The workers that started must end, or the process never exits.
            self.stop.set(Status.CRASHED, "worker threads could not start")
            feed.finish(workers.count)
            workers.wait(self.config.shutdown_timeout)
            raise
        self._supervise(workers)
        workers.join_producer(timeout=1.0)
        self.role.after_workers()

    def _supervise(self, workers: Executor) -> None:
        """The main thread while workers work: checkpoints, and the shutdown timeout."""
        stopped_at: float | None = None
        while True:
            done = workers.wait(TICK_S)
            now = time.monotonic()
            if not done and not self.outage.active:
                self.checkpoints.tick()
                self.role.tick()
            if self.stop.is_set() and stopped_at is None:
                # Also when this process's workers finished before a tick saw
                # the stop: its helpers must hear of it all the same, or they
                # go on with everything fed (seen: a SIGTERMed leader waited
                # 28 s for its local helper).
                self.role.stopping()
                stopped_at = now
            if done:
                return
            if stopped_at is not None and now - stopped_at > self.config.shutdown_timeout:
                self.fence.closed.set()
                self.abandoned = True
                self.progress.abandon()
                self.reporter.notice(
                    f"in-flight items did not finish within {self.config.shutdown_timeout:g}s "
                    "of the stop: they are rolled back"
                )
                return

    def _unit(self, feed: Feed) -> Unit:
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
            keys=self.keys,
            on_failure=self._item_failed,
            changes=self.changes,
            watch_sqlite_lock=SqliteLockWatch(self.reporter.notice) if watch else None,
            before_commit=None if self.config.dry_run else self.checkpoints.in_transaction,
            commit_check=self.commit_check,
            batch_size=self.config.batch_size,
            adapt=not self.config.fixed_batch_size,
            in_hook=self.in_hook,
            blocking=self.loop.blocking if self.loop is not None else None,
            one_chunk_size=self.loop is not None,
            bounded_waits=self.database.family == "postgresql" and not self.config.dry_run,
        )

    def _settling(self) -> tuple[history.KeyRecorder | None, TxidCheck | None]:
        """How a commit cut by an outage is settled: by the item's resume key,
        or else on PostgreSQL by the transaction's id. A dry run never commits."""
        if self.config.dry_run:
            return None, None
        run_id, key_of = self.opening.run_id, self.job.item_key
        if key_of and run_id:
            return history.KeyRecorder(run_id, key_of), None
        return None, TxidCheck() if self.database.family == "postgresql" else None

    def _filter(self) -> ItemFilter:
        return ItemFilter(
            self.opening.skip_keys, self.job.item_key, self.progress.skip, taken_over=self.role.skip_keys()
        )

    def _started(self, items: Any, session: Session | None) -> None:
        if hasattr(items, "__len__"):
            self.progress.total = len(items)
        elif self.job.count is not None:
            self.progress.total = int(self.job.count(self.ctx, session))
        run_id = self.opening.run_id
        self.reporter.started(self.job.name, total=self.progress.total, progress=self.progress, run_id=run_id)

    def _item_failed(self, item: Any, token: Any, error: BaseException, settled: bool) -> None:
        """An item failed alone; ``settled``: the feed recorded it already (in
        the transaction that isolated it)."""
        shown, line = safe_repr(item), error_line(error)
        if not settled and not self.feed.settle_failure(token, item, shown, line):
            return  # another process holds the item now: it is theirs
        failed = self.progress.failure(shown, line)
        log.error("item %s failed: %s", shown, line, exc_info=error, extra={"item_failure": True})
        limit = self.config.max_failures
        if limit is not None and failed > limit:
            self.stop.set(Status.ABORTED, f"aborted: more than {limit} items failed")

    def _failed(self, what: str, error: BaseException) -> None:
        """setup() or items() raised: the run fails (exit 1), or, if the
        database went away under it, stops as unavailable (exit 69)."""
        if isinstance(error, ConfigError):
            self.config_error = error  # raised after the run is recorded: one line, exit 2
            self.stop.set(Status.FAILED, str(error))
            return
        if isinstance(error, DatabaseUnavailable):
            self.stop.set(Status.UNAVAILABLE, str(error))
            log.info("%s", error)  # the outage has said why, once
            return
        if classify(error) is Kind.GONE:
            message = f"the database went away while {what} ran: {error_line(error)}"
            self.stop.set(Status.UNAVAILABLE, message)
        else:
            message = f"{what} raised {error_line(error)}"
            self.error = self.error or message
        log.error("%s", message, exc_info=error)

    def _result(self, started_at: datetime, t0: float) -> RunResult:
        snap, extra = self.role.counts(self.progress.snapshot())
        message = self.stop.message or self.error
        if message and snap["rolled_back"]:
            message += f" ({snap['rolled_back']} finished items were rolled back, not committed)"
        return RunResult(
            job=self.job.name,
            status=self.stop.reason or (Status.FAILED if self.error or snap["failed"] else Status.SUCCEEDED),
            dry_run=self.config.dry_run,
            **{key: snap[key] for key in COUNTS},
            started_at=started_at,
            finished_at=datetime.now(UTC),
            duration_seconds=time.monotonic() - t0,
            items_seconds=self.progress.items_seconds(),
            workers=1 if self.config.dry_run else self.config.workers,
            batch_size=self.config.batch_size,
            changes=self.changes.report() if self.changes else {},
            chunk_sizes=self.progress.chunk_sizes(),
            **extra,
            error=message,
            signal=self.stop.signal,
            run_id=self.opening.run_id,
            resumed_from=self.opening.resumed_from,
        )
