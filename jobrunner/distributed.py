"""A run spread over processes and hosts, coordinated by PostgreSQL.

A distributed run is the single-process run with a different feed (the work
table of ``worktable.py``) and more than one process. Its leader is the
process that holds the job's lock: it runs ``setup()`` and ``items()``,
feeds the work table, processes items like everyone else, and ends the run
when the table is empty. Helpers (``--processes`` starts some on this host,
``--join`` makes any start on any host one) claim chunks from the table.

Who may commit, without trusting a lease or a clock:

- a helper holds the job's *helpers key*, shared, on a connection of its
  own; a new run's leader tries that key exclusively before doing anything,
  so no new run starts while a helper of an older one can still commit;
- a helper commits only while its run's leader's lock connection (named in
  the run's row as ``pid@backend_start``) is alive and the run is running,
  checked every heartbeat like the lock itself (``locking.HelperFence``).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from datetime import UTC
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session

from jobrunner import history, jobs, tables
from jobrunner.config import Config
from jobrunner.counters import Counters
from jobrunner.db import Database
from jobrunner.exceptions import EX_SIGINT, ConfigError, HelpersRemain, describe_holder, exit_for
from jobrunner.locking import helpers_still_working
from jobrunner.outage import Outage
from jobrunner.result import MAX_FAILURES_LISTED, ItemFailure, Status, error_line
from jobrunner.stop import Stop
from jobrunner.worktable import Feeder, WorkTableFeed, first_free_seq, retry_gone

log = logging.getLogger("jobrunner")
JOIN_WAIT_S = 5.0  # a joiner that lost the race for the lock waits this long for the winner's row
TICK_S = 0.2


def check_supported(config: Config) -> None:
    """Before anything is opened or created: a refused run leaves nothing behind."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    where = config.origin("processes") if config.processes > 1 else config.origin("join")
    try:
        dialect = make_url(config.database_url).get_backend_name()
    except (ArgumentError, ValueError):
        return  # the database's own check names what is wrong with the URL
    if dialect == "sqlite":
        raise ConfigError(
            f"{where}: a distributed run needs PostgreSQL (SQLite has no row-level claiming, "
            "and its writers take turns anyway)"
        )
    if dialect != "postgresql":
        raise ConfigError(f"{where}: a distributed run needs PostgreSQL (its work table and helper fencing)")


# -- the record of every process ---------------------------------------------------------
class ProcessRow:
    """This process's row in ``jobrunner_run_processes``."""

    def __init__(self, database: Database, run_id: int, role: str, workers: int, outage: Outage) -> None:
        self.database = database
        self.key = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid()}
        self.role = role
        self.workers = workers
        self.outage = outage
        self._next = 0.0

    def register(self) -> None:
        now = history.utcnow()
        values = {**self.key, "role": self.role, "started_at": now, "checkpoint_at": now}
        self._write(
            insert(tables.run_processes).values(status=Status.RUNNING.value, workers=self.workers, **values)
        )

    def tick(self, progress: Counters) -> None:
        if time.monotonic() >= self._next:
            self._next = time.monotonic() + history.CHECKPOINT_S
            self._update(progress.snapshot(), checkpoint_at=history.utcnow())

    def finish(self, status: Status, progress: Counters) -> None:
        now = history.utcnow()
        self._update(progress.snapshot(), status=status.value, finished_at=now, checkpoint_at=now)

    def _update(self, counts: dict[str, Any], **values: Any) -> None:
        rows = tables.run_processes
        where = [rows.c[name] == value for name, value in self.key.items()]
        keep = ("succeeded", "failed", "retried", "replayed", "rolled_back", "commits")
        self._write(update(rows).where(*where).values(**{k: counts[k] for k in keep}, **values))

    def _write(self, statement: Any) -> None:
        def write() -> None:
            with self.database.bookkeeping() as session, session.begin():
                session.execute(statement)

        try:
            retry_gone(self.outage, write)
        except Exception as error:  # noqa: BLE001 - bookkeeping never stops the work
            log.info("cannot record this process in the run's history: %s", error_line(error))


# -- the leader ---------------------------------------------------------------------------
class Leader:
    """The lock holder's duties in a distributed run."""

    def __init__(
        self,
        database: Database,
        config: Config,
        job: jobs.Job,
        run_id: int,
        *,
        stop: Stop,
        outage: Outage,
        notice: Callable[[str], None],
    ) -> None:
        self.database = database
        self.config = config
        self.job = job
        self.run_id = run_id
        self.stop = stop
        self.outage = outage
        self.notice = notice
        self.row = ProcessRow(database, run_id, "leader", config.workers, outage)
        self.children: list[Any] = []
        self._reported: set[int] = set()
        self._feed: WorkTableFeed | None = None
        self.adopted = 0
        self.adopted_keys: frozenset[str] = frozenset()
        self.fed_all_before = False
        self.first_seq = 0

    @staticmethod
    def refuse_if_helpers_remain(database: Database, job: str) -> None:
        """Holding the job's lock, before anything else: helpers of an earlier
        run that can still commit mean this run must not start (exit 75)."""
        if helpers_still_working(database, job):
            who = _describe_helpers(database, job)
            raise HelpersRemain(job, message=f"helpers of an earlier run of {job} can still commit{who}")

    def open(self, backend: str | None, resumed_from: int | None) -> None:
        """Make the run joinable, and take over what a resumed run left."""
        if resumed_from is not None:
            self._adopt(resumed_from)
        values = {"accepts_helpers": True, "leader_backend": backend, "fed": self.adopted, "fed_all": False}
        with self.database.bookkeeping() as session, session.begin():
            session.execute(update(tables.runs).where(tables.runs.c.id == self.run_id).values(**values))
        self.row.register()

    def _adopt(self, old: int) -> None:
        """The items a distributed run left undone (in its work table, or failed)
        become this run's, keeping their order; what it never fed is fed again."""
        work, failures, runs = tables.work, tables.failures, tables.runs
        with self.database.bookkeeping() as session, session.begin():
            self.fed_all_before = bool(session.scalar(select(runs.c.fed_all).where(runs.c.id == old)))
            moved = history.rowcount(
                session.execute(update(work).where(work.c.run_id == old).values(run_id=self.run_id))
            )
            keys = session.execute(select(work.c.key).where(work.c.run_id == self.run_id)).scalars()
            self.adopted_keys = frozenset(key for key in keys if key is not None)
            rows = []
            if self.fed_all_before:
                # items() will not run again: the items that failed are redone from here.
                top = session.scalar(select(func.max(work.c.seq)).where(work.c.run_id == self.run_id))
                seq = 0 if top is None else top + 1
                redo = session.execute(
                    select(failures.c.payload).where(
                        failures.c.run_id == old, failures.c.payload.is_not(None)
                    )
                ).scalars()
                rows = [{"run_id": self.run_id, "seq": seq + i, "item": p} for i, p in enumerate(redo)]
                if rows:
                    session.execute(insert(work), rows)
        self.adopted = moved + len(rows)
        self.first_seq = first_free_seq(self.database, self.run_id)
        if self.adopted:
            self.notice(f"took over {self.adopted} items that run {old} left undone")

    @property
    def must_feed(self) -> bool:
        """False when the resumed run had fed everything: items() is not called again."""
        return not self.fed_all_before

    def feed(self) -> WorkTableFeed:
        if self._feed is None:
            self._feed = WorkTableFeed(
                self.database,
                self.run_id,
                stop=self.stop.event,
                outage=self.outage,
                leader=True,
                feeder=self.feeder,
                fed_all=self.mark_fed_all,
            )
        return self._feed

    def settle_failure(self, token: Any, item: Any, shown: str, line: str) -> bool:
        return self.feed().settle_failure(token, item, shown, line)

    def open_backend(self, backend: str | None) -> None:
        """The lock was taken again on a new connection: name it for the helpers."""
        with self.database.bookkeeping() as session, session.begin():
            session.execute(
                update(tables.runs).where(tables.runs.c.id == self.run_id).values(leader_backend=backend)
            )

    def feeder(self) -> Feeder:
        bound = max(2 * 500, 8 * self.config.workers * self.config.batch_size * self.config.processes)
        return Feeder(
            self.database,
            self.run_id,
            bound=bound,
            batch_size=self.config.batch_size,
            item_key=self.job.item_key,
            stop=self.stop.event,
            outage=self.outage,
            first_seq=self.first_seq,
        )

    def mark_fed_all(self) -> None:
        """Called once feeding ends, fed or not: the helpers finish what was
        fed, then leave. After the last COPY committed (see WorkTableFeed._claim)."""

        def mark() -> None:
            with self.database.bookkeeping() as session, session.begin():
                session.execute(
                    update(tables.runs).where(tables.runs.c.id == self.run_id).values(fed_all=True)
                )

        retry_gone(self.outage, mark)

    def start_local_helpers(self) -> None:
        """``--processes P``: P - 1 more processes on this host. Spawned, not
        forked: each starts a fresh interpreter and opens its own engine."""
        context = multiprocessing.get_context("spawn")
        for _ in range(self.config.processes - 1):
            child = context.Process(target=local_helper, args=(self.config, self.run_id), daemon=False)
            child.start()
            self.children.append(child)

    def tick(self, progress: Counters) -> None:
        """The main thread: checkpoint this process, say when a local helper
        died, and apply --max-failures to the whole run."""
        self.row.tick(progress)
        self._report_dead_helpers()
        limit = self.config.max_failures
        if limit is not None and not self.stop.is_set():
            try:
                failed = _count(self.database, tables.failures, self.run_id)
            except Exception as error:  # noqa: BLE001 - counted again at the next tick
                log.info("cannot count the run's failures: %s", error_line(error))
                return
            if failed > limit:
                self.stop.set(Status.ABORTED, f"aborted: more than {limit} items failed")

    def request_stop(self) -> None:
        """Tell the helpers to stop taking items (they finish what is in flight)."""
        reason = self.stop.message or "stopped"
        try:
            with self.database.bookkeeping() as session, session.begin():
                session.execute(
                    update(tables.runs).where(tables.runs.c.id == self.run_id).values(stop_requested=reason)
                )
        except Exception as error:  # noqa: BLE001 - the helpers stop anyway when the run ends
            log.info("cannot ask the helpers to stop: %s", error_line(error))

    def finish(self, progress: Counters, timeout: float) -> dict[str, Any]:
        """Wait for this host's helpers, then total the run over every process."""
        deadline = time.monotonic() + timeout
        for child in self.children:
            child.join(max(0.1, deadline - time.monotonic()))
            if child.is_alive():
                child.terminate()
                child.join(5)
        self._report_dead_helpers()
        return retry_gone(self.outage, lambda: totals(self.database, self.run_id, progress))

    def _report_dead_helpers(self) -> None:
        """A local helper that died (a signal, an internal error) is said once:
        its items in flight went back to the work table, and the others did
        them; its last seconds of counts are lost with it."""
        for child in self.children:
            code = child.exitcode
            if code is None or code in _HELPER_ENDINGS or child.pid in self._reported:
                continue
            self._reported.add(child.pid)
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            self.notice(
                f"helper pid {child.pid} on this host {how}: the items it had in flight went back to the "
                "work table for the other processes; the counts it had not yet recorded are lost with it"
            )


def forget_other_runs(database: Database, job: str, keep: int) -> int:
    """Holding the job's lock, once this run has taken over what it resumes:
    the work-table rows of every other run of the job are of no use to anyone
    (only the latest unfinished run can be resumed, and no helper of theirs
    can still commit), so they go. Without this a crashed run's rows stayed
    for good."""
    work, runs, counts = tables.work, tables.runs, tables.chunk_commits
    others = select(runs.c.id).where(runs.c.job == job, runs.c.id != keep)
    with database.bookkeeping() as session, session.begin():
        session.execute(delete(counts).where(counts.c.run_id.in_(others)))  # in their history rows now
        return history.rowcount(session.execute(delete(work).where(work.c.run_id.in_(others))))


def totals(database: Database, run_id: int, progress: Counters) -> dict[str, Any]:
    """The run's counts over all its processes. ``succeeded`` comes from the
    work table itself: an item left it by a commit that did it, or by a
    recorded failure; the rest is still there."""
    runs, failures, processes = tables.runs, tables.failures, tables.run_processes
    with database.bookkeeping() as session:
        fed = session.scalar(select(runs.c.fed).where(runs.c.id == run_id)) or 0
        commits = history.chunk_commits(session, run_id)
        failed = _count_in(session, failures, run_id)
        left = _count_in(session, tables.work, run_id)
        listed = session.execute(
            select(failures.c.item, failures.c.error)
            .where(failures.c.run_id == run_id)
            .order_by(failures.c.seq)
            .limit(MAX_FAILURES_LISTED)
        ).all()
        others = session.execute(
            select(
                func.coalesce(func.sum(processes.c.retried), 0),
                func.coalesce(func.sum(processes.c.replayed), 0),
                func.coalesce(func.sum(processes.c.rolled_back), 0),
                func.count(),
                func.count(func.distinct(processes.c.host)),
            ).where(processes.c.run_id == run_id, processes.c.role != "leader")
        ).one()
    mine = progress.snapshot()
    return {
        "succeeded": fed - failed - left,
        "failed": failed,
        "left": left,
        "failures": tuple(ItemFailure(item, error) for item, error in listed),
        "retried": mine["retried"] + others[0],
        "replayed": mine["replayed"] + others[1],
        "rolled_back": mine["rolled_back"] + others[2],
        # Counted by the chunks' own transactions: the processes' rows miss
        # what a helper that died committed after its last checkpoint.
        "commits": commits,
        "helpers": others[3],
        "hosts": others[4],
    }


def _count(database: Database, table: Any, run_id: int) -> int:
    with database.bookkeeping() as session:
        return _count_in(session, table, run_id)


def _count_in(session: Session, table: Any, run_id: int) -> int:
    return session.scalar(select(func.count()).select_from(table).where(table.c.run_id == run_id)) or 0


def _describe_helpers(database: Database, job: str) -> str:
    processes, runs = tables.run_processes, tables.runs
    with database.bookkeeping() as session:
        row = session.execute(
            select(processes.c.pid, processes.c.host, processes.c.started_at)
            .join(runs, runs.c.id == processes.c.run_id)
            .where(
                runs.c.job == job, processes.c.role == "helper", processes.c.status == Status.RUNNING.value
            )
            .order_by(processes.c.started_at.desc())
            .limit(1)
        ).first()
    if row is None:
        return ""
    return describe_holder({"pid": row.pid, "host": row.host, "since": row.started_at.replace(tzinfo=UTC)})


# -- helpers ----------------------------------------------------------------------------------
def joinable_run(database: Database, job: str) -> tuple[int | None, bool]:
    """The run of ``job`` in progress: its id, and whether it accepts helpers.
    A run that just took the lock writes its row a moment later: wait a little."""
    runs = tables.runs
    deadline = time.monotonic() + JOIN_WAIT_S
    while True:
        with database.bookkeeping() as session:
            row = session.execute(
                select(runs.c.id, runs.c.accepts_helpers, runs.c.leader_backend)
                .where(runs.c.job == job, runs.c.status == Status.RUNNING.value, history.locked(runs))
                .order_by(runs.c.id.desc())
                .limit(1)
            ).first()
        if row is not None:
            return row.id, bool(row.accepts_helpers)
        if time.monotonic() >= deadline:
            return None, False
        time.sleep(0.1)


# Exit codes of a helper that ended as a helper ends, or that said why itself
# in one line (an error of its own: 2, 69, 70): the leader speaks only of a
# helper that could not, one killed by a signal.
_HELPER_ENDINGS = frozenset({0, 1, 2, 69, 70, 75, 130, 143})

# What a local helper says on the terminal. The leader reports the run for
# every process (totals, failed items, the abort or the signal), so a helper
# speaks only of what ended it alone: the run lost under it, the database
# gone, a crash.
_HELPER_SPEAKS = frozenset({Status.LOCK_LOST, Status.UNAVAILABLE, Status.CRASHED})


def local_helper(config: Config, run_id: int) -> None:
    """The body of a helper process started by ``--processes`` (spawned: a
    fresh interpreter, so it sets up the redaction and the one-line errors
    that ``cli.main`` gives the leader)."""
    from jobrunner import redaction, report

    sys.stdout = redaction.RedactingStream(sys.stdout)
    sys.stderr = redaction.RedactingStream(sys.stderr)
    config = dataclasses.replace(config, quiet=True, json=False, processes=1, join=False)
    report.setup_logging(config)
    reporter = report.make_reporter(config)
    try:
        job = jobs.load(config.jobs_path, config.job or "")
        job_config = config.with_job_defaults(job.defaults, str(job.path))
        from jobrunner import runner

        with tables.ready_database(job_config, job.name, workers=job_config.workers) as database:
            result, abandoned = runner.help_run(job_config, job, database, reporter, run_id)
    except Exception as error:  # noqa: BLE001 - one line, as the leader would print it
        code, what = exit_for(error)
        line = f"helper pid {os.getpid()} of run {run_id}: {what}"
        if config.debug:
            import traceback

            traceback.print_exc()
        report.print_error(line)
        report.log_error(line)
        sys.exit(code)
    except KeyboardInterrupt:  # Ctrl-C reached the process group before its handlers were set
        sys.exit(EX_SIGINT)
    reporter.finished(result, terminal=result.status in _HELPER_SPEAKS)
    if abandoned:
        runner.leave_now(result.exit_code)
    sys.exit(result.exit_code)
