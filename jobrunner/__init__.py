"""jobrunner: run batch jobs against a SQL database, concurrently and safely.

The API for job authors is small: a job module defines ``items(ctx, session)``
and ``process(ctx, session, item)``; ``ctx`` is a :class:`JobContext`.
"""

from jobrunner.context import JobContext
from jobrunner.exceptions import (
    ConfigError,
    DatabaseUnavailable,
    JobError,
    JobrunnerError,
    LockHeld,
    LockLost,
)
from jobrunner.result import ItemFailure, RunResult, Status

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DatabaseUnavailable",
    "ItemFailure",
    "JobContext",
    "JobError",
    "JobrunnerError",
    "LockHeld",
    "LockLost",
    "RunResult",
    "Status",
    "__version__",
]
