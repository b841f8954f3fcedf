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
import sys
import threading
import time
from datetime import datetime
from typing import IO, Any

from jobrunner.config import Config, redact_url
from jobrunner.result import RunResult, Status

log = logging.getLogger("jobrunner")


# -- logging -----------------------------------------------------------------------
class _Redacting(logging.Filter):
    """Last line of defence: no database password in any log record."""

    def __init__(self, secret: str | None) -> None:
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        message = redact_url(record.getMessage())
        if self.secret:
            message = message.replace(self.secret, "***")
        record.msg, record.args = message, None
        return True


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now, so that rich's live progress,
    which redirects it, can keep log lines from tearing the bar."""

    @property  # type: ignore[override]
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, _value: IO[str]) -> None:
        pass


class _OneLine(logging.Formatter):
    """Tracebacks only with --debug; the log file always gets them."""

    def __init__(self, fmt: str, *, tracebacks: bool) -> None:
        super().__init__(fmt, datefmt="%Y-%m-%dT%H:%M:%S")
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        if self.tracebacks:
            return super().format(record)
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text = saved


def setup_logging(config: Config, *, secret: str | None = None) -> None:
    root = logging.getLogger("jobrunner")
    root.handlers.clear()
    root.propagate = False
    root.setLevel(logging.DEBUG)
    redact = _Redacting(secret)

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
        try:
            handler = logging.FileHandler(config.log_file, encoding="utf-8")
        except OSError as error:
            from jobrunner.exceptions import ConfigError

            raise ConfigError(f"--log-file {config.log_file}: {error.strerror}") from None
        handler.setLevel(logging.DEBUG if config.debug else logging.INFO)
        handler.addFilter(redact)
        handler.setFormatter(
            _OneLine(
                "%(asctime)s %(process)d %(threadName)s %(levelname)s %(name)s: %(message)s",
                tracebacks=True,
            )
        )
        root.addHandler(handler)


# -- reporters ---------------------------------------------------------------------
def make_reporter(config: Config, *, stderr: IO[str] | None = None) -> Reporter:
    stderr = stderr or sys.stderr
    tty = stderr.isatty()
    if tty and not config.quiet:
        return TerminalReporter(config, stderr)
    return PlainReporter(config, stderr)


class Reporter:
    """Plain text, for cron: timestamps, no escape codes, nothing redrawn."""

    def __init__(self, config: Config, stderr: IO[str]) -> None:
        self.config = config
        self.stderr = stderr
        self.human: IO[str] = stderr if config.json else sys.stdout

    # called by the runner
    def started(self, job: str, *, total: int | None, progress: Any) -> None:
        pass

    def notice(self, text: str) -> None:
        if not self.config.quiet:
            self._line(self.stderr, text)

    def finished(self, result: RunResult) -> None:
        self._stop_progress()
        if self.config.json:
            sys.stdout.write(json.dumps(result.as_dict()) + "\n")
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
            self.stderr.write(f"{result.job}: {result.error}\n")

    # formatting
    def _stop_progress(self) -> None:
        pass

    def _line(self, out: IO[str], text: str) -> None:
        out.write(f"{datetime.now().astimezone():%Y-%m-%dT%H:%M:%S%z} {text}\n")
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


class PlainReporter(Reporter):
    def started(self, job: str, *, total: int | None, progress: Any) -> None:
        self._progress = progress
        self._t0 = time.monotonic()
        self._done = threading.Event()
        if self.config.quiet:
            return
        of = f" of {total}" if total is not None else ""
        mode = " (dry run)" if self.config.dry_run else ""
        self._line(
            self.human,
            f"{job}: started{mode}, {self.config.workers} workers, "
            f"{'items' + of if of else 'counting items as they come'}",
        )
        thread = threading.Thread(target=self._tick, name="jobrunner-progress", daemon=True)
        thread.start()

    def _tick(self) -> None:
        while not self._done.wait(self.config.progress_interval):
            snap = self._progress.snapshot()
            elapsed = time.monotonic() - self._t0
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


class TerminalReporter(Reporter):
    """rich progress bar and summary table, for a person at a terminal."""

    def __init__(self, config: Config, stderr: IO[str]) -> None:
        super().__init__(config, stderr)
        from rich.console import Console

        self.console = Console(file=stderr)
        self.out_console = self.console if config.json else Console(file=sys.stdout)
        self._bar = None

    def started(self, job: str, *, total: int | None, progress: Any) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = [TextColumn("[bold]{task.description}")]
        if total is not None:
            columns += [BarColumn(), MofNCompleteColumn()]
        else:
            columns += [TextColumn("{task.completed} done")]
        columns += [
            TextColumn("{task.fields[rate]:.1f} items/s"),
            TimeElapsedColumn(),
        ]
        if total is not None:
            columns.append(TimeRemainingColumn())
        columns.append(TextColumn("[red]{task.fields[failed]} failed"))
        self._bar = Progress(*columns, console=self.console, transient=False)
        self._task = self._bar.add_task(job, total=total, rate=0.0, failed=0)
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
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        self._bar.update(
            self._task, completed=snap["done"], rate=snap["done"] / elapsed, failed=snap["failed"]
        )

    def _stop_progress(self) -> None:
        if self._bar is not None:
            self._done.set()
            self._refresh()
            self._bar.stop()

    def notice(self, text: str) -> None:
        self.console.print(f"[yellow]{text}")

    def _summary(self, result: RunResult, out: IO[str]) -> None:
        from rich.table import Table

        console = self.out_console
        style = "green" if result.status is Status.SUCCEEDED else "red"
        title = f"{result.job}: [{style}]{result.status.value}[/]" + (" (dry run)" if result.dry_run else "")
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column(justify="right")
        for label, value in (
            ("succeeded", result.succeeded),
            ("failed", result.failed),
            ("retried", result.retried),
            ("skipped", result.skipped),
            ("duration", f"{result.duration_seconds:.2f} s"),
            ("rate", f"{result.rate:.1f} items/s"),
        ):
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
                f"failed {failure.item}: {failure.error}", style="red", markup=False, highlight=False
            )
        if result.failed > 10:
            console.print(f"... and {result.failed - 10} more failures (see --json or the log)")


def summary_line(result: RunResult) -> str:
    dry = " (dry run)" if result.dry_run else ""
    return (
        f"{result.job}: {result.status.value}{dry}: {result.succeeded} succeeded, "
        f"{result.failed} failed, {result.retried} retried, {result.skipped} skipped "
        f"in {result.duration_seconds:.2f}s ({result.rate:.1f} items/s)"
    )


def print_error(message: str, *, secret: str | None = None) -> None:
    message = redact_url(message)
    if secret:
        message = message.replace(secret, "***")
    sys.stderr.write(f"jobrunner: error: {message}\n")


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

        def clean(holder: dict | None) -> dict | None:
            if holder is None:
                return None
            return {
                k: v.isoformat(timespec="seconds") if isinstance(v, datetime) else v
                for k, v in holder.items()
            }

        print(json.dumps([{**row, "holder": clean(row["holder"])} for row in rows]))
        return
    if not rows:
        print("no jobs found")
        return
    width = max(len(row["job"]) for row in rows)
    for row in rows:
        if row["lock"] == "none":
            state = "not locked (no_lock)"
        elif row["running"]:
            state = "running" + describe_holder(row["holder"] or {})
        else:
            state = "idle"
        print(f"{row['job']:<{width}}  {state}")


HISTORY_COLUMNS = (
    "id",
    "job",
    "status",
    "dry_run",
    "started_at",
    "finished_at",
    "succeeded",
    "failed",
    "retried",
    "skipped",
    "workers",
    "host",
    "pid",
    "resumed_from",
    "error",
)


def print_history(rows: list[dict[str, Any]], *, json_output: bool = False) -> None:
    from datetime import UTC

    def when(value: datetime | None) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None else None  # stored as naive UTC

    records = [
        {k: row.get(k) for k in HISTORY_COLUMNS}
        | {"started_at": when(row["started_at"]), "finished_at": when(row["finished_at"])}
        for row in rows
    ]
    if json_output:
        print(
            json.dumps(
                [
                    {
                        k: v.isoformat(timespec="seconds") if isinstance(v, datetime) else v
                        for k, v in r.items()
                    }
                    for r in records
                ]
            )
        )
        return
    if not records:
        print("no runs recorded")
        return
    headers = ("id", "job", "status", "started", "duration", "ok", "failed", "retried", "skipped", "error")
    lines = []
    for r in records:
        started = r["started_at"].astimezone() if r["started_at"] else None
        duration = (
            f"{(r['finished_at'] - r['started_at']).total_seconds():.1f}s"
            if r["finished_at"] and r["started_at"]
            else ""
        )
        status = r["status"] + (" (dry)" if r["dry_run"] else "")
        lines.append(
            (
                str(r["id"]),
                r["job"],
                status,
                f"{started:%Y-%m-%d %H:%M:%S}" if started else "",
                duration,
                str(r["succeeded"]),
                str(r["failed"]),
                str(r["retried"]),
                str(r["skipped"]),
                (r["error"] or "")[:80],
            )
        )
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(*headers)
        for line in lines:
            table.add_row(*line, style="red" if line[2].split()[0] not in ("succeeded", "running") else None)
        Console().print(table)
        return
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def print_purge(runs: int, keys: int, *, json_output: bool = False) -> None:
    if json_output:
        print(json.dumps({"runs_deleted": runs, "keys_deleted": keys}))
    else:
        print(f"deleted {runs} runs and {keys} item keys")
