"""What differs between the runs of a job: the role a run is given.

``runner.py`` builds one run, the same for every process; its role supplies
what differs:

- :class:`Single`: a run in one process. It holds the job's lock, writes the
  run's history, and feeds ``items()`` through memory.
- :class:`Leading`: the lock holder of a distributed run. As Single, but it
  feeds the PostgreSQL work table, starts local helpers, settles failures in
  the table, and totals the run over every process.
- :class:`Helping`: a process that helps a run led elsewhere. Its right to
  commit is the helper fence, its items come from the work table, it neither
  sets up nor feeds, and its record is its row in ``jobrunner_run_processes``.
- :class:`Rehearsal`: a dry run. As Single, but every session lives in one
  transaction on one connection, rolled back at the end, and the items run
  in this thread, one chunk after another (see ``dryrun.py``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from jobrunner import distributed, dryrun, history, locking
from jobrunner.exceptions import first_line
from jobrunner.executor import Executor, Serial, Workers
from jobrunner.feed import Feed, MemoryFeed
from jobrunner.locking import Guard, HelperFence
from jobrunner.outage import Kind, classify
from jobrunner.result import Status
from jobrunner.worktable import WorkTableFeed

if TYPE_CHECKING:
    from jobrunner.runner import _Run

log = logging.getLogger("jobrunner")


class Single:
    """A run in one process (or a dry run)."""

    name: str | None = None  # RunResult.role
    sets_up = True
    must_feed = True  # items() is called (False: a resumed run that fed everything)

    def __init__(self) -> None:
        self.run: _Run | None = None

    def bind(self, run: _Run) -> None:
        self.run = run

    @property
    def r(self) -> _Run:
        assert self.run is not None, "a role is bound to its run first"
        return self.run

    # -- the right to commit ----------------------------------------------------------
    def lock_mode(self) -> str:
        return self.r.config.lock

    def hold(self) -> contextlib.AbstractContextManager[Any]:
        """The job's lock for the whole run (raises LockHeld if it is taken)."""
        r = self.r
        if r.config.no_lock:
            return contextlib.nullcontext()
        r.reporter.phase("waiting for the lock" if r.config.wait_lock else "taking the lock")
        return Guard(
            r.database,
            r.job.name,
            mode=self.lock_mode(),
            wait=r.config.wait_lock,
            heartbeat=r.config.heartbeat,
            on_lost=lambda why: r.stop.set(Status.LOCK_LOST, f"lock lost: {why}; nothing commits after this"),
            may_retake=lambda: r.opening.run_id is not None and r.recorder.still_ours(),
            retake_within=r.config.outage_timeout,
            notice=r.reporter.notice,
            on_retake=self.new_backend,
        )

    def new_backend(self, backend: str | None) -> None:
        """The lock was taken again on a new connection."""

    # -- start and end ------------------------------------------------------------------
    def open(self) -> None:
        """Holding the lock: start the run's history."""
        r = self.r
        if r.guard is not None and r.database.family == "postgresql":
            # Any run that takes the lock, distributed or not: a helper of an
            # earlier run that can still commit must be gone first.
            distributed.Leader.refuse_if_helpers_remain(r.database, r.job.name)
            locking.end_earlier_writers(r.database, r.job.name, r.reporter.notice)
        lock = r.guard.mode if isinstance(r.guard, Guard) else "none"
        resumable = r.job.item_key is not None
        r.opening = history.open_run(
            r.recorder, r.config, lock=lock, resumable=resumable, info=r.reporter.info
        )
        self.forget_other_runs()

    def forget_other_runs(self) -> None:
        """A single-process run feeds no work table: whatever an earlier
        distributed run left there is redone through items() and resume keys."""
        r = self.r
        if r.guard is not None and r.database.family == "postgresql" and r.opening.run_id is not None:
            distributed.forget_other_runs(r.database, r.job.name, keep=r.opening.run_id)

    def close(self, result: Any) -> None:
        """Before the lock is released: the next run must not find this one
        still 'running' and mark it crashed."""
        self.r.recorder.finish(result, patient=not self.r.abandoned)

    # -- items ----------------------------------------------------------------------------
    def feed(self) -> Feed:
        r = self.r
        room = r.config.workers * r.config.batch_size
        if r.loop is not None:
            room = max(room, r.config.items_in_flight + r.config.batch_size)
        return MemoryFeed(room, r.stop.event)

    def sessions(self) -> contextlib.AbstractContextManager[Any]:
        """Where the run's sessions come from (``.session()``, ``.reader()``),
        for as long as its setup and items run."""
        return contextlib.nullcontext(self.r.async_database or self.r.database)

    def executor(self, unit: Any, feed: Feed) -> Executor:
        """The threads that run the items, one session each; or, for an
        async job, the tasks on the loop, one AsyncSession each."""
        r = self.r
        if r.loop is not None:
            from jobrunner import aio

            assert r.async_database is not None
            if isinstance(feed, MemoryFeed):
                memory = feed
                take: Any = lambda session, wait=True: memory.take(  # noqa: E731
                    session, unit.chunk_size().size, wait=wait
                )
            else:  # the work table: claims wait off the loop
                take = lambda session: feed.take(session, unit.chunk_size().size)  # noqa: E731
                feed.blocking = r.loop.blocking  # type: ignore[attr-defined]
            if isinstance(feed, MemoryFeed):
                r.progress.concurrency = r.config.items_in_flight  # for the start line
            return aio.Tasks(
                loop=r.loop,
                database=r.async_database,
                workers=r.config.workers,
                concurrency=r.config.items_in_flight,
                batch_size=r.config.batch_size,
                take=take,
                unit=unit,
                pause=lambda: not r.outage.active or r.outage.wait(),
                paused=lambda: r.outage.active,
                claims=not isinstance(feed, MemoryFeed),
                task_scope=r.in_task,
                thread_name=self.thread_name(),
            )
        return Workers(
            workers=r.config.workers,
            open_session=r.database.session,
            close_session=Session.close,
            take=lambda session: feed.take(session, unit.chunk_size().size),
            work=unit,
            pause=lambda: not r.outage.active or r.outage.wait(),
            thread_name=self.thread_name(),
            thread_scope=r.in_thread,
        )

    def substitute_items(self) -> Iterable[Any] | None:
        """Items to report instead of calling items() (see must_feed)."""
        return None

    def skip_keys(self) -> frozenset[str]:
        """Keys of items this run took over already (besides --resume's)."""
        return frozenset()

    # -- while the workers work ---------------------------------------------------------
    def tick(self) -> None:
        """The main thread, a few times a second, while the database answers."""

    def stopping(self) -> None:
        """The run has just been told to stop."""

    def after_workers(self) -> None:
        """Every worker of this process has finished."""

    def counts(self, snap: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The result's counts, and the result's extra fields for this role."""
        return snap, {"failures": tuple(self.r.progress.failures)}

    def thread_name(self) -> str:
        return f"jobrunner-{self.r.job.name}"


class Leading(Single):
    """The lock holder of a distributed run."""

    name = "leader"

    def __init__(self) -> None:
        super().__init__()
        self.leader: distributed.Leader | None = None
        self.totals: dict[str, Any] | None = None

    @property
    def must_feed(self) -> bool:  # type: ignore[override]
        return self.leader is None or self.leader.must_feed

    def lock_mode(self) -> str:
        """Always the advisory lock: a row lock gives the lock's transaction an
        id for the whole run, and that id holds back VACUUM of every table,
        the work table first (measured: 476,400 of its dead rows not
        removable after 40 s). The advisory lock excludes the same runs."""
        r = self.r
        if r.config.lock == "row" and "lock" in r.config.origins:
            log.info(
                '%s: a distributed run takes the job\'s lock as an advisory lock (lock = "row" applies '
                "to single-process runs): a row lock would hold back VACUUM for the whole run",
                r.config.origin("lock"),
            )
        return "advisory"

    def forget_other_runs(self) -> None:
        pass  # after open() has taken over what the resumed run left

    def open(self) -> None:
        super().open()
        r = self.r
        if r.opening.run_id is None:
            return  # no history row: the run goes on in this process alone
        self.leader = distributed.Leader(
            r.database,
            r.config,
            r.job,
            r.opening.run_id,
            stop=r.stop,
            outage=r.outage,
            notice=r.reporter.notice,
        )
        backend = r.guard.backend if isinstance(r.guard, Guard) else None
        self.leader.open(backend, r.opening.resumed_from)
        distributed.forget_other_runs(r.database, r.job.name, keep=r.opening.run_id)
        # Now, not after setup(): a spawned interpreter takes a second to start.
        self.leader.start_local_helpers()

    def close(self, result: Any) -> None:
        super().close(result)
        if self.leader is not None:  # its own row in jobrunner_run_processes, as a helper's
            self.leader.row.finish(result.status, self.r.progress)

    def new_backend(self, backend: str | None) -> None:
        """Helpers follow the lock to its new connection."""
        if self.leader is not None:
            self.leader.open_backend(backend)

    def feed(self) -> Feed:
        if self.leader is None:
            return super().feed()
        feed = self.leader.feed()
        feed.count_retry = self.r.progress.retry
        return feed

    def substitute_items(self) -> Iterable[Any] | None:
        if self.leader is not None and not self.leader.must_feed:
            return range(self.leader.adopted)
        return None

    def skip_keys(self) -> frozenset[str]:
        return self.leader.adopted_keys if self.leader is not None else frozenset()

    def tick(self) -> None:
        if self.leader is not None:
            self.leader.tick(self.r.progress)

    def stopping(self) -> None:
        if self.leader is not None:
            self.leader.request_stop()

    def after_workers(self) -> None:
        if self.leader is None:
            return
        try:
            self.totals = self.leader.finish(self.r.progress, timeout=self.r.config.shutdown_timeout + 10)
        except Exception as error:
            if classify(error) is not Kind.GONE:
                raise
            # The run ends with 69 already; its result counts this process.
            self.r.reporter.notice(
                f"cannot total the run over its processes (the database is gone: {first_line(error)}): "
                "the counts are this process's"
            )

    def counts(self, snap: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        if self.leader is None or self.totals is None:
            return super().counts(snap)
        totals = self.totals
        counted = ("succeeded", "failed", "retried", "replayed", "rolled_back", "commits")
        extra = {
            "failures": totals["failures"],
            "role": "leader",
            "processes": 1 + totals["helpers"],
            "hosts": max(1, totals["hosts"]),
        }
        return {**snap, **{k: totals[k] for k in counted}}, extra


class Helping(Single):
    """A process helping run ``run_id``, led by another process."""

    name = "helper"
    sets_up = False

    def __init__(self, run_id: int) -> None:
        super().__init__()
        self.run_id = run_id
        self.fence: HelperFence | None = None
        self.row: distributed.ProcessRow | None = None
        self._feed: WorkTableFeed | None = None

    def hold(self) -> contextlib.AbstractContextManager[Any]:
        r = self.r
        self.fence = HelperFence(
            r.database,
            r.job.name,
            self.run_id,
            heartbeat=r.config.heartbeat,
            on_lost=self._lost,
            may_retake=lambda: True,
            retake_within=r.config.outage_timeout,
            notice=r.reporter.notice,
        )
        return self.fence

    def _lost(self, why: str) -> None:
        if self.fence is not None and self.fence.finished_by_leader:
            # Seen between this helper's last commit and its workers' last
            # look at the work table: they leave by themselves, and this
            # helper's part ends by its own counts, not with 69.
            log.info("run %s was ended by its leader", self.run_id)
            return
        self.r.stop.set(Status.LOCK_LOST, f"the run ended under this helper: {why}")

    def open(self) -> None:
        r = self.r
        r.opening = history.Opening(self.run_id, None, frozenset())
        self.row = distributed.ProcessRow(r.database, self.run_id, "helper", r.config.workers, r.outage)
        self.row.register()
        r.reporter.started(r.job.name, total=None, progress=r.progress, run_id=self.run_id, role="helper")

    def close(self, result: Any) -> None:
        if self.row is not None:
            self.row.finish(result.status, self.r.progress)

    def feed(self) -> Feed:
        if self._feed is None:
            r = self.r
            self._feed = WorkTableFeed(
                r.database, self.run_id, stop=r.stop.event, outage=r.outage, leader=False
            )
            self._feed.count_retry = r.progress.retry
        return self._feed

    def tick(self) -> None:
        r = self.r
        if self.row is not None:
            self.row.tick(r.progress)
        requested = self.fence.stop_requested if self.fence is not None else None
        if requested and not r.stop.is_set():
            r.stop.set(Status.INTERRUPTED, f"the leader stopped run {self.run_id}: {requested}")

    def after_workers(self) -> None:
        """Nothing left to claim while the leader's lock is in doubt: wait to
        learn whether it comes back before calling this helper's part a success
        (a run whose leader died has not succeeded, and says so with exit 69)."""
        if self.fence is not None:
            self.fence.settle(self.fence.not_yet_within + 2 * self.fence.heartbeat)

    def counts(self, snap: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        counts, extra = super().counts(snap)
        return counts, {**extra, "role": "helper"}

    def thread_name(self) -> str:
        return f"jobrunner-{self.r.job.name}-helper"


class Rehearsal(Single):
    """A dry run: the one run, in one transaction that is rolled back."""

    def __init__(self) -> None:
        super().__init__()
        self._sessions: Any = None  # a dryrun.OneTransaction, or aio's

    def sessions(self) -> contextlib.AbstractContextManager[Any]:
        r = self.r
        if r.async_database is not None:
            from jobrunner import aio

            self._sessions = aio.OneTransaction(r.async_database)
        else:
            self._sessions = dryrun.OneTransaction(r.database)
        return self._sessions

    def forget_other_runs(self) -> None:
        pass  # a dry run changes nothing: a crashed run it passes over stays resumable

    def feed(self) -> Feed:
        assert self._sessions is not None, "the feed comes after the sessions"
        r = self.r
        return dryrun.SerialFeed(self._sessions, r.config.batch_size, r.stop.event)

    def executor(self, unit: Any, feed: Feed) -> Executor:
        if isinstance(feed, dryrun.SerialFeed):
            feed.unit = unit
        # An async job's one transaction is the loop's to use: the work runs there.
        return Serial(self.r.loop.call if self.r.loop is not None else None)


def for_config(config: Any) -> Single:
    """The role of a run that takes the job's lock."""
    if config.dry_run:
        return Rehearsal()
    return Leading() if config.distributed else Single()
