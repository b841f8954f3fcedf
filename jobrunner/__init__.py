"""jobrunner: run batch jobs against a SQL database, concurrently and safely.

The API for job authors is small: a job module defines ``items(ctx, session)``
and ``process(ctx, session, item)``; ``ctx`` is a :class:`JobContext`, and
:func:`paged` streams keys from a large table without one long snapshot.
"""

from typing import Any

from jobrunner.context import JobContext
from jobrunner.exceptions import (
    ConfigError,
    DatabaseUnavailable,
    JobError,
    JobrunnerError,
    LockHeld,
)
from jobrunner.result import ItemFailure, RunResult, Status

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # paged() needs SQLAlchemy; importing it lazily keeps `jobrunner --help`
    # and `jobrunner list` from paying for SQLAlchemy's import.
    if name == "paged":
        from jobrunner.paging import paged

        return paged
    raise AttributeError(f"module 'jobrunner' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "DatabaseUnavailable",
    "ItemFailure",
    "JobContext",
    "JobError",
    "JobrunnerError",
    "LockHeld",
    "RunResult",
    "Status",
    "__version__",
    "paged",
]
