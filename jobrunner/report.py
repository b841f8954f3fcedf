"""Everything the operator sees: progress, summaries, --json, and logging.

- On a terminal (stderr is a tty): a rich progress bar on stderr, then a
  summary table.
- Otherwise (cron, pipes, files): plain timestamped lines, no ANSI codes: a
  start line, a progress line every ``progress_interval`` seconds, and a
  one-line summary.
- ``--json``: exactly one JSON object on stdout; everything human goes to stderr.
- ``--quiet``: nothing on success; failures and errors still reach stderr.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from jobrunner import redaction
from jobrunner.config import Config
from jobrunner.exceptions import ConfigError, local_time
from jobrunner.result import RunResult, Status

log = logging.getLogger("jobrunner")


# -- logging -----------------------------------------------------------------------
STAMP = "%Y-%m-%dT%H:%M:%S%z"  # one format for every line jobrunner writes, with the offset
# The run's own story (start, end, notices, phases) goes to the log file
# whatever --quiet does to the terminal; the terminal hears it through the reporter.
story = logging.getLogger("jobrunner.story")
story.propagate = False
story.addHandler(logging.NullHandler())  # no log file: the story is told on the terminal only


def stamp(when: datetime | None = None) -> str:
    return (when or datetime.now()).astimezone().strftime(STAMP)


class _Redacting(logging.Filter):
    """Last line of defence: no database password in any log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redaction.redact(record.getMessage()), None
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = redaction.redact(logging.Formatter().formatException(record.exc_info))
        return True


class _NotItemFailures(logging.Filter):
    """On a terminal the summary lists failed items: the log does not print them twice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "item_failure", False)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now, so that rich's live progress,
    which redirects it, can keep log lines from tearing the bar."""

    @property
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, _value: IO[str]) -> None:
        pass


class _OneLine(logging.Formatter):
    """Tracebacks only with --debug; the log file always gets them."""

    def __init__(self, fmt: str, *, tracebacks: bool) -> None:
        super().__init__(fmt)
        self.tracebacks = tracebacks

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return stamp(datetime.fromtimestamp(record.created))

    def format(self, record: logging.LogRecord) -> str:
        if self.tracebacks:
            return super().format(record)
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text = saved


def setup_logging(config: Config) -> None:
    root = logging.getLogger("jobrunner")
    root.handlers.clear()
    root.propagate = False
    root.setLevel(logging.DEBUG)
    story.handlers[:] = [logging.NullHandler()]
    story.setLevel(logging.INFO)
    redact = _Redacting()

    if config.quiet:
        level = logging.ERROR
    elif config.debug or config.verbose >= 2:
        level = logging.DEBUG
    elif config.verbose:
        level = logging.INFO
    else:
        level = logging.WARNING
    console = _StderrHandler()
    console.setLevel(level)
    console.addFilter(redact)
    console.setFormatter(_OneLine("%(asctime)s %(levelname)s %(message)s", tracebacks=config.debug))
    root.addHandler(console)

    if config.log_file:
        path = Path(config.log_file)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(path, encoding="utf-8")
        except OSError as error:
            raise ConfigError(
                f"log file {path} (from {config.origin('log_file')}): {error.strerror or error}"
            ) from None
        handler.setLevel(logging.DEBUG if config.debug else logging.INFO)
        handler.addFilter(redact)
        handler.setFormatter(
            _OneLine(
                "%(asctime)s %(process)d %(threadName)s %(levelname)s %(name)s: %(message)s",
                tracebacks=True,
            )
        )
        root.addHandler(handler)
        story.addHandler(handler)


def log_error(message: str) -> None:
    """An error that ends the command: into the log file, if there is one."""
    story.error("%s", message)


# -- reporters ---------------------------------------------------------------------
def make_reporter(config: Config, *, stderr: IO[str] | None = None) -> BaseReporter:
    stderr = stderr or sys.stderr
    tty = stderr.isatty()
    if tty and not config.quiet:
        return TerminalReporter(config, stderr)
    return PlainReporter(config, stderr)


def _run_label(run_id: int | None, role: str | None) -> str:
    """``run 7``, or ``helper of run 7``: one run, one pair of start and end lines."""
    run = f"run {run_id}" if run_id is not None else "run (unrecorded)"
    return f"helper of {run}" if role == "helper" else run


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class BaseReporter:
    """Plain text, for cron: timestamps, no escape codes, nothing redrawn."""

    def __init__(self, config: Config, stderr: IO[str]) -> None:
        self.config = config
        self.stderr = stderr
        self.human: IO[str] = stderr if config.json else sys.stdout

    # called by the runner
    def phase(self, text: str) -> None:
        story.info("%s: %s", self.config.job, text)

    def started(
        self, job: str, *, total: int | None, progress: Any, run_id: int | None, role: str | None = None
    ) -> None:
        of = f"{total} items" if total is not None else "items counted as they come"
        batch = f", batches of {self.config.batch_size}" if self.config.batch_size > 1 else ""
        if self.config.processes > 1 and not self.config.dry_run:
            batch = f" in each of {self.config.processes} processes{batch}"
        mode = " (dry run)" if self.config.dry_run else ""
        story.info(
            "%s: %s started%s: pid %d on %s, %s%s, %s",
            job,
            _run_label(run_id, role),
            mode,
            os.getpid(),
            socket.gethostname(),
            plural(1 if self.config.dry_run else self.config.workers, "worker"),
            batch,
            of,
        )

    def notice(self, text: str) -> None:
        story.warning("%s: %s", self.config.job, text)
        if not self.config.quiet:
            self._line(self.stderr, text)

    def info(self, text: str) -> None:
        """Worth a line, not a warning (an alert on WARNING lines ignores it)."""
        story.info("%s: %s", self.config.job, text)
        if not self.config.quiet:
            self._line(self.stderr, text)

    def finished(self, result: RunResult, *, terminal: bool = True) -> None:
        """The run's end: into the log file, and (unless ``terminal`` is
        false) onto the terminal and ``--json``."""
        self._stop_progress()
        self._log_end(result)
        if not terminal:
            return
        if self.config.json:
            sys.stdout.write(redaction.redact(json.dumps(result.as_dict())) + "\n")
            sys.stdout.flush()
        if result.status is Status.LOCKED:
            if not self.config.quiet:
                self.stderr.write(f"{result.error}\n")
            return
        if self.config.quiet and result.status is Status.SUCCEEDED:
            return
        out = self.stderr if self.config.quiet else self.human
        self._summary(result, out)
        if result.error and result.status is not Status.SUCCEEDED:
            self.stderr.write(redaction.redact(f"{result.job}: {result.error}") + "\n")

    def _log_end(self, result: RunResult) -> None:
        if result.status is Status.LOCKED:
            story.info("%s: not started: %s (exit %d)", result.job, result.error, result.exit_code)
            return
        story.info(
            "%s: %s ended: %s, exit %d, %.2fs",
            result.job,
            _run_label(result.run_id, result.role),
            summary_line(result).split(": ", 1)[1],
            result.exit_code,
            result.duration_seconds,
        )
        if result.error:
            story.info("%s: %s", result.job, result.error)

    # formatting
    def _stop_progress(self) -> None:
        pass

    def _line(self, out: IO[str], text: str) -> None:
        out.write(redaction.redact(f"{stamp()} {text}") + "\n")
        out.flush()

    def _summary(self, result: RunResult, out: IO[str]) -> None:
        self._line(out, summary_line(result))
        if result.dry_run:
            for table, counts in result.changes.items():
                self._line(
                    out, f"  would change {table}: " + ", ".join(f"{n} {kind}" for kind, n in counts.items())
                )
            if not result.changes:
                self._line(out, "  would change no rows")


class PlainReporter(BaseReporter):
    def started(
        self, job: str, *, total: int | None, progress: Any, run_id: int | None, role: str | None = None
    ) -> None:
        super().started(job, total=total, progress=progress, run_id=run_id, role=role)
        self._progress = progress
        self._done = threading.Event()
        if self.config.quiet:
            return
        of = f" of {total}" if total is not None else ""
        mode = " (dry run)" if self.config.dry_run else ""
        workers = 1 if self.config.dry_run else self.config.workers
        processes = self.config.processes if not self.config.dry_run else 1
        spread = f" in each of {processes} processes" if processes > 1 else ""
        bound = getattr(progress, "concurrency", None)
        tasks = f" (async, up to {bound} items in flight)" if bound and not self.config.dry_run else ""
        self._line(
            self.human,
            f"{job}: started{mode}, {plural(workers, 'worker')}{tasks}{spread}, "
            f"{'items' + of if of else 'counting items as they come'}",
        )
        thread = threading.Thread(target=self._tick, name="jobrunner-progress", daemon=True)
        thread.start()

    def _tick(self) -> None:
        while not self._done.wait(self.config.progress_interval):
            snap = self._progress.snapshot()
            elapsed = self._progress.items_seconds()
            total = f"/{snap['total']}" if snap["total"] is not None else ""
            self._line(
                self.human,
                f"{self.config.job}: {snap['done']}{total} done, "
                f"{snap['failed']} failed, {snap['done'] / elapsed if elapsed else 0:.1f} items/s",
            )

    def _stop_progress(self) -> None:
        done = getattr(self, "_done", None)
        if done is not None:
            done.set()


class TerminalReporter(BaseReporter):
    """rich progress bar and summary table, for a person at a terminal."""

    def __init__(self, config: Config, stderr: IO[str]) -> None:
        super().__init__(config, stderr)
        from rich.console import Console

        self.console = Console(file=stderr)
        self.out_console = self.console if config.json else Console(file=sys.stdout)
        self._bar: Any = None  # rich's Progress bar, once the run has started
        self._status: Any = None  # rich's Status spinner, while a phase lasts
        for handler in logging.getLogger("jobrunner").handlers:
            if isinstance(handler, _StderrHandler):
                handler.addFilter(_NotItemFailures())

    def phase(self, text: str) -> None:
        super().phase(text)
        if self._status is None:
            self._status = self.console.status(f"{self.config.job}: {text}")
            self._status.start()
        else:
            self._status.update(f"{self.config.job}: {text}")

    def _end_phase(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def started(
        self, job: str, *, total: int | None, progress: Any, run_id: int | None, role: str | None = None
    ) -> None:
        BaseReporter.started(self, job, total=total, progress=progress, run_id=run_id, role=role)
        self._end_phase()
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        columns: list[Any] = [TextColumn("[bold]{task.description}")]
        if total is not None:
            columns += [BarColumn(), MofNCompleteColumn()]
        else:
            columns += [TextColumn("{task.completed} done")]
        columns += [
            TextColumn("{task.fields[rate]:.1f} items/s"),
            TextColumn("elapsed {task.fields[elapsed]}"),
        ]
        if total is not None:
            columns.append(TextColumn("eta {task.fields[eta]}"))
        columns.append(TextColumn("[red]{task.fields[failed]} failed"))
        self._bar = Progress(*columns, console=self.console, transient=False)
        self._task = self._bar.add_task(
            job, total=total, rate=0.0, failed=0, elapsed="0:00:00", eta="-:--:--"
        )
        self._source = progress
        self._t0 = time.monotonic()
        self._done = threading.Event()
        self._bar.start()
        threading.Thread(target=self._tick, name="jobrunner-progress", daemon=True).start()

    def _tick(self) -> None:
        while not self._done.wait(0.2):
            self._refresh()

    def _refresh(self) -> None:
        snap = self._source.snapshot()
        busy = max(self._source.items_seconds(), 1e-9)
        rate = snap["done"] / busy
        eta = "-:--:--"
        if snap["total"] is not None and rate > 0:
            eta = _clock(max(0, snap["total"] - snap["done"] - snap["skipped"]) / rate)
        self._bar.update(
            self._task,
            completed=snap["done"] + snap["skipped"],
            rate=rate,
            failed=snap["failed"],
            elapsed=_clock(time.monotonic() - self._t0),
            eta=eta,
        )

    def _stop_progress(self) -> None:
        self._end_phase()
        if self._bar is not None:
            self._done.set()
            self._refresh()
            self._bar.stop()

    def notice(self, text: str) -> None:
        story.warning("%s: %s", self.config.job, text)
        # Not markup: a notice quotes errors and items, where "[/tmp/x]"
        # raised rich's MarkupError and "[bold]" vanished.
        self.console.print(redaction.redact(text), style="yellow", markup=False, highlight=False)

    def _summary(self, result: RunResult, out: IO[str]) -> None:
        from rich.table import Table

        console = self.out_console
        style = "green" if result.status is Status.SUCCEEDED else "red"
        title = f"{result.job}: [{style}]{result.status.value}[/]" + (" (dry run)" if result.dry_run else "")
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column(justify="right")
        rows: list[tuple[str, Any]] = [
            ("succeeded", result.succeeded),
            ("failed", result.failed),
            ("retried", result.retried),
            ("skipped", result.skipped),
        ]
        if result.batch_size > 1:
            rows += [("replayed", result.replayed), ("commits", result.commits)]
        if result.rolled_back:
            rows.append(("rolled back", result.rolled_back))
        rows += [
            ("duration", f"{result.duration_seconds:.2f} s"),
            ("processing", f"{result.items_seconds:.2f} s"),
            ("rate", f"{result.rate:.1f} items/s"),
        ]
        for label, value in rows:
            table.add_row(label, str(value))
        console.print(table)
        if result.dry_run:
            changes = Table(title="would change", title_justify="left")
            for column in ("table", "insert", "update", "delete"):
                changes.add_column(column, justify="left" if column == "table" else "right")
            for name, counts in result.changes.items():
                changes.add_row(name, *(str(counts[k]) for k in ("insert", "update", "delete")))
            console.print(changes if result.changes else "would change no rows")
        for failure in result.failures[:10]:
            console.print(
                redaction.redact(f"failed {failure.item}: {failure.error}"),
                style="red",
                markup=False,
                highlight=False,
            )
        if result.failed > 10:
            console.print(f"... and {result.failed - 10} more failures (see --json or the log)")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def summary_line(result: RunResult) -> str:
    dry = " (dry run)" if result.dry_run else ""
    batches = ""
    if result.batch_size > 1:
        batches = f", {result.replayed} replayed, {plural(result.commits, 'commit')}"
        sizes = result.chunk_sizes
        if sizes and sizes["min"] < result.batch_size:
            batches += f" (chunks of {sizes['min']:g} to {sizes['max']:g} items, mean {sizes['mean']:g})"
    if result.rolled_back:
        batches += f", {result.rolled_back} rolled back"
    return (
        f"{result.job}: {result.status.value}{dry}: {result.succeeded} succeeded, "
        f"{result.failed} failed, {result.retried} retried, {result.skipped} skipped{batches} "
        f"in {result.duration_seconds:.2f}s ({result.rate:.1f} items/s over {result.items_seconds:.2f}s "
        "of processing)"
    )


def print_error(message: str, *, prefix: str = "error") -> None:
    sys.stderr.write(f"jobrunner: {prefix}: {redaction.redact(message)}\n")


def print_error_json(message: str, exit_code: int, job: str | None) -> None:
    """--json promises one object on stdout, even when the command fails early."""
    out = {"job": job, "status": "error", "exit_code": exit_code, "error": redaction.redact(message)}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()


def print_jobs(found: list[Any], *, json_output: bool = False) -> None:
    if json_output:
        print(json.dumps([{"job": j.name, "path": str(j.path), "summary": j.summary} for j in found]))
        return
    if not found:
        print("no jobs found")
        return
    width = max(len(j.name) for j in found)
    for job in found:
        print(f"{job.name:<{width}}  {job.summary}".rstrip())


def print_status(rows: list[dict[str, Any]], *, json_output: bool = False) -> None:
    from jobrunner.exceptions import describe_holder

    if json_output:
        print(json.dumps(rows, default=_json_value))
        return
    if not rows:
        print("no jobs found")
        return
    width = max(len(row["job"]) for row in rows)
    for row in rows:
        states = []
        if row["holder"] is not None:
            states.append("running" + describe_holder(row["holder"] or {}))
        helpers = row.get("helpers") or []
        if helpers:
            hosts = len({h["host"] for h in helpers})
            states[-1] += f", with {plural(len(helpers), 'helper')} on {plural(hosts, 'host')}"
        for run in row["unlocked_runs"]:
            states.append(f"running without a lock: run {run['run_id']}" + describe_holder(run))
        if not states:
            states.append("idle" + (" (no_lock)" if row["lock"] == "none" else ""))
        print(f"{row['job']:<{width}}  {'; '.join(states)}")


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    raise TypeError(f"{type(value).__name__} is not JSON")


HISTORY_COLUMNS = (
    "id",
    "job",
    "status",
    "dry_run",
    "started_at",
    "finished_at",
    "checkpoint_at",
    "succeeded",
    "failed",
    "retried",
    "skipped",
    "replayed",
    "rolled_back",
    "commits",
    "workers",
    "batch_size",
    "lock",
    "host",
    "pid",
    "resumed_from",
    "error",
    "processes",
)
HISTORY_HEADERS = (
    "id",
    "job",
    "status",
    "started",
    "duration",
    "ok",
    "failed",
    "retried",
    "skipped",
    "host",
    "pid",
    "procs",
    "error",
)


def print_history(rows: list[dict[str, Any]], *, json_output: bool = False) -> None:
    from datetime import UTC

    def when(value: datetime | None) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None else None  # stored as naive UTC

    records = [
        {k: row.get(k) for k in HISTORY_COLUMNS}
        | {k: when(row.get(k)) for k in ("started_at", "finished_at", "checkpoint_at")}
        for row in rows
    ]
    if json_output:
        print(redaction.redact(json.dumps(records, default=_json_value)))
        return
    if not records:
        print("no runs recorded")
        return
    lines = [_history_line(r) for r in records]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(*HISTORY_HEADERS)
        for line in lines:
            table.add_row(*line, style="red" if line[2].split()[0] not in ("succeeded", "running") else None)
        Console().print(table)
        return
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(HISTORY_HEADERS)]
    print("  ".join(h.ljust(w) for h, w in zip(HISTORY_HEADERS, widths, strict=True)).rstrip())
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def _history_line(r: dict[str, Any]) -> tuple[str, ...]:
    started = r["started_at"].astimezone() if r["started_at"] else None
    if r["finished_at"] and r["started_at"]:
        duration = f"{(r['finished_at'] - r['started_at']).total_seconds():.1f}s"
    elif r["checkpoint_at"] and r["started_at"]:
        # Still running, or ended unrecorded: at least until its last checkpoint.
        duration = f">{(r['checkpoint_at'] - r['started_at']).total_seconds():.1f}s"
    else:
        duration = ""
    status = r["status"] + (" (dry)" if r["dry_run"] else "")
    return (
        str(r["id"]),
        r["job"],
        status,
        local_time(started) if started else "",
        duration,
        str(r["succeeded"] or 0),
        str(r["failed"] or 0),
        str(r["retried"] or 0),
        str(r["skipped"] or 0),
        r["host"] or "",
        str(r["pid"] or ""),
        _processes(r["processes"] or []),
        redaction.redact(r["error"] or "")[:100],
    )


def _processes(members: list[dict[str, Any]]) -> str:
    """``1``, or for a distributed run ``3 (2 hosts)``."""
    if not members:
        return "1"
    hosts = len({m["host"] for m in members})
    return f"{len(members)} ({plural(hosts, 'host')})"


def print_purge(runs: int, keys: int, *, json_output: bool = False) -> None:
    if json_output:
        print(json.dumps({"runs_deleted": runs, "keys_deleted": keys}))
    else:
        print(f"deleted {runs} runs and {keys} item keys")
