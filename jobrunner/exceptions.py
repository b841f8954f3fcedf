"""Every error jobrunner reports to an operator, each with its exit code.

The CLI catches ``JobrunnerError`` in one place, prints ``str(exc)`` on one
line and exits with ``exc.exit_code``. A subclass's docstring is its default
message.
"""

from __future__ import annotations

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


class LockLost(JobrunnerError):
    """The run lost its lock."""

    exit_code = EX_UNAVAILABLE


def exit_for(error: Exception) -> tuple[int, str]:
    """The exit code and the one line for an error that ends a command: a
    domain error says what it is; anything else is a bug in jobrunner."""
    if isinstance(error, JobrunnerError):
        return error.exit_code, str(error)
    return (
        EX_SOFTWARE,
        f"internal error: {type(error).__name__}: {error} (rerun with --debug for the traceback)",
    )


def describe_holder(holder: dict) -> str:
    """`` (pid 4121 on host-a since 12:05:01)`` or empty when nothing is known."""
    if not holder.get("pid"):
        return ""
    since = holder.get("since")
    when = f" since {since:%Y-%m-%d %H:%M:%S}" if since is not None else ""
    return f" (pid {holder['pid']} on {holder.get('host', '?')}{when})"
