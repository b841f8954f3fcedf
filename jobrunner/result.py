"""The one record of a run: built by the runner, read by the reporter, --json,
the history table and the metrics file."""

from __future__ import annotations

import dataclasses
import enum
from datetime import UTC, datetime
from typing import Any

from jobrunner import exceptions
from jobrunner.exceptions import error_line

# A run's counts, in the order the summary, --json, history and metrics give them.
COUNTS = ("succeeded", "failed", "retried", "skipped", "replayed", "rolled_back", "commits")

MAX_FAILURES_LISTED = 100
__all__ = ["MAX_FAILURES_LISTED", "ItemFailure", "RunResult", "Status", "error_line", "safe_repr"]


class Status(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABORTED = "aborted"
    INTERRUPTED = "interrupted"
    CRASHED = "crashed"
    LOCK_LOST = "lock-lost"
    UNAVAILABLE = "unavailable"  # the database stayed away longer than --outage-timeout
    LOCKED = "locked"


@dataclasses.dataclass(frozen=True)
class ItemFailure:
    item: str  # repr() of the item: items may hold anything, the record holds text
    error: str  # "ExceptionType: message"

    def as_dict(self) -> dict[str, str]:
        return {"item": self.item, "error": self.error}


@dataclasses.dataclass(frozen=True)
class RunResult:
    job: str
    status: Status
    dry_run: bool = False
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    skipped: int = 0
    replayed: int = 0  # items of failed chunks, tried again to isolate their bad items
    rolled_back: int = 0  # items finished but not committed because the run stopped
    commits: int = 0  # item transactions (chunks) committed
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_seconds: float = 0.0
    items_seconds: float = 0.0  # from the first item handed out to the last one done
    workers: int = 0
    batch_size: int = 1
    failures: tuple[ItemFailure, ...] = ()
    # {"table": {"insert": n, "update": n, "delete": n}}, dry runs only
    changes: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    # {"min": n, "max": n, "mean": x} over the chunks this process committed
    chunk_sizes: dict[str, float] | None = None
    error: str | None = None  # why the run ended early, when it did
    signal: int | None = None  # the signal that interrupted it
    holder: dict[str, Any] | None = None  # who holds the lock, for LOCKED
    resumed_from: int | None = None
    run_id: int | None = None
    role: str | None = None  # a distributed run: "leader" or "helper"
    processes: int = 1  # processes that worked on the run (the leader counts them)
    hosts: int = 1

    @classmethod
    def locked(cls, job: str, held: Any, *, started_at: datetime, duration: float, config: Any) -> RunResult:
        """The result of a run that found its job already running (exit 75)."""
        return cls(
            job=job,
            status=Status.LOCKED,
            dry_run=config.dry_run,
            started_at=started_at,
            finished_at=datetime.now(UTC),
            duration_seconds=duration,
            workers=config.workers,
            batch_size=config.batch_size,
            error=str(held),
            holder=held.holder,
        )

    @property
    def exit_code(self) -> int:
        return {
            Status.SUCCEEDED: exceptions.EX_OK,
            Status.FAILED: exceptions.EX_FAILED,
            Status.ABORTED: exceptions.EX_FAILED,
            Status.LOCK_LOST: exceptions.EX_UNAVAILABLE,
            Status.UNAVAILABLE: exceptions.EX_UNAVAILABLE,
            Status.LOCKED: exceptions.EX_TEMPFAIL,
            Status.INTERRUPTED: (exceptions.EX_SIGINT if self.signal == 2 else exceptions.EX_SIGTERM),
        }.get(self.status, exceptions.EX_SOFTWARE)

    @property
    def processed(self) -> int:
        return self.succeeded + self.failed

    @property
    def rate(self) -> float:
        """Items per second while items were being processed (not setup or the lock wait)."""
        seconds = self.items_seconds or self.duration_seconds
        return self.processed / seconds if seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The --json summary."""
        out: dict[str, Any] = {
            "job": self.job,
            "status": self.status.value,
            "dry_run": self.dry_run,
            **{name: getattr(self, name) for name in COUNTS},
            "duration_seconds": round(self.duration_seconds, 3),
            "items_seconds": round(self.items_seconds, 3),
            "items_per_second": round(self.rate, 1),
            "workers": self.workers,
            "batch_size": self.batch_size,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "exit_code": self.exit_code,
            "error": self.error,
            "failures": [f.as_dict() for f in self.failures[:MAX_FAILURES_LISTED]],
        }
        if self.batch_size > 1:
            out["chunk_sizes"] = self.chunk_sizes
        if self.dry_run:
            out["changes"] = self.changes
        if self.holder is not None:
            out["holder"] = {k: _iso(v) if isinstance(v, datetime) else v for k, v in self.holder.items()}
        if self.run_id is not None:
            out["run_id"] = self.run_id
        if self.resumed_from is not None:
            out["resumed_from"] = self.resumed_from
        if self.role is not None:
            out.update(role=self.role, processes=self.processes, hosts=self.hosts)
        return out


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def safe_repr(item: Any) -> str:
    """repr() of an item for the record: at most 200 characters, never raising."""
    try:
        text = repr(item)
    except Exception:  # noqa: BLE001
        text = f"<{type(item).__name__} (repr failed)>"
    return text if len(text) <= 200 else text[:197] + "..."
