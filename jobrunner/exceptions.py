"""Every error jobrunner reports to an operator, each with its exit code.

The CLI catches ``JobrunnerError`` in one place, prints ``str(exc)`` on one
line and exits with ``exc.exit_code``. A subclass's docstring is its default
message.
"""

from __future__ import annotations

from datetime import datetime

EX_OK = 0
EX_FAILED = 1  # the run finished, some items failed (or it was aborted)
EX_USAGE = 2
EX_UNAVAILABLE = 69  # database unreachable, or the lock was lost mid-run
EX_SOFTWARE = 70  # a bug in jobrunner itself
EX_TEMPFAIL = 75  # another run of the job holds its lock
EX_SIGINT = 130
EX_SIGTERM = 143


class JobrunnerError(Exception):
    """jobrunner failed."""

    exit_code: int = EX_SOFTWARE

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(JobrunnerError):
    """The configuration is not valid."""

    exit_code = EX_USAGE


class JobError(ConfigError):
    """The job cannot be loaded."""


class DatabaseUnavailable(JobrunnerError):
    """The database cannot be reached."""

    exit_code = EX_UNAVAILABLE


class LockHeld(JobrunnerError):
    """The job is already running."""

    exit_code = EX_TEMPFAIL

    def __init__(self, job: str, holder: dict | None = None, message: str | None = None) -> None:
        self.job = job
        self.holder = holder or {}
        super().__init__(message or f"{job} is already running{describe_holder(self.holder)}")


class HelpersRemain(LockHeld):
    """Helpers of an earlier distributed run of the job can still commit."""


class RunOver(JobrunnerError):
    """The run is over: a helper has nothing to help."""

    exit_code = EX_UNAVAILABLE


class ItemRefused(ConfigError):
    """items() yielded something jobrunner does not take as an item. The run
    stops; it is recorded as failed, with this line; exit 2 (the job's code
    must change, so retrying will not help)."""


class ItemNotPortable(ItemRefused):
    """An item cannot travel through the work table to other processes."""


class CommitInDoubt(JobrunnerError):
    """The connection was lost during COMMIT: the outcome is unknown. The
    item fails rather than be retried, since it may have committed (a job
    with item_key lets jobrunner check instead)."""

    exit_code = EX_FAILED


class ItemRolledBack(JobrunnerError):
    """The job's code rolled back (or closed) the item's session: its work is
    gone, so the item fails rather than count as done."""

    exit_code = EX_FAILED


class CannotUndo(JobrunnerError):
    """MySQL and MariaDB commit DDL at once, inside any transaction: a dry
    run cannot undo it, so it refuses the statement (the item or setup fails)."""

    exit_code = EX_FAILED


class WorkerCrashed(JobrunnerError):
    """A worker loop died of an error outside any item (a jobrunner bug)."""

    exit_code = EX_SOFTWARE


def exit_for(error: Exception) -> tuple[int, str]:
    """The exit code and the one line for an error that ends a command: a
    domain error says what it is; anything else is a bug in jobrunner."""
    if isinstance(error, JobrunnerError):
        return error.exit_code, str(error)
    return (
        EX_SOFTWARE,
        f"internal error: {type(error).__name__}: {error} (rerun with --debug for the traceback)",
    )


def first_line(error: BaseException) -> str:
    """The first line of an error's message (a DBAPI error's driver message,
    without the SQL and parameters SQLAlchemy appends), passwords masked."""
    from jobrunner import redaction

    orig = getattr(error, "orig", None) or error
    lines = [line.strip() for line in str(orig).strip().splitlines() if line.strip()]
    return redaction.redact(lines[0] if lines else type(orig).__name__)


def error_line(error: BaseException) -> str:
    """``ExceptionType: message`` on one line, without SQL, parameters or passwords."""
    from jobrunner import redaction

    orig = getattr(error, "orig", None)
    if orig is not None and hasattr(error, "connection_invalidated"):  # a DBAPIError
        lines = [line.strip() for line in str(orig).strip().splitlines() if line.strip()]
        text = lines[0] if lines else ""
        name = type(orig).__name__
    else:
        text = " ".join(str(error).split())
        name = type(error).__name__
    return redaction.redact(f"{name}: {text}" if text else name)


def local_time(when: datetime) -> str:
    """``2026-12-01 20:11:20 -0500``: a time as the operator reads it, in the
    machine's zone, with the offset (a time without one is ambiguous across
    hosts and daylight-saving changes)."""
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S %z")


def describe_holder(holder: dict) -> str:
    """`` (pid 4121 on host-a since 12:05:01)`` or empty when nothing is known."""
    if not holder.get("pid"):
        return ""
    since = holder.get("since")
    when = f" since {local_time(since)}" if since is not None else ""
    return f" (pid {holder['pid']} on {holder.get('host', '?')}{when})"
