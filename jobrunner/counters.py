"""The run's counters, shared by the workers; everyone else reads snapshots."""

from __future__ import annotations

import threading
import time
from typing import Any

from jobrunner.result import COUNTS, MAX_FAILURES_LISTED, ItemFailure


class Counters:
    """Counts in items (``commits`` in transactions); one lock, short holds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.succeeded = self.failed = self.retried = self.skipped = 0
        self.replayed = self.rolled_back = self.commits = 0
        self.in_flight = 0  # items taken by a worker and not yet settled
        self.chunks: list[int] = [0, 0, 0, 0]  # committed chunks: count, items, smallest, largest
        self._abandoned = False
        self.failures: list[ItemFailure] = []
        self.total: int | None = None
        self.concurrency: int | None = None  # an async run's bound on items in flight
        self.first_item_at: float | None = None
        self.last_item_at: float | None = None

    def started_items(self, count: int = 0) -> None:
        with self._lock:
            self.in_flight += count
            if self.first_item_at is None:
                self.first_item_at = time.monotonic()

    def settled(self, count: int) -> None:
        """A chunk taken by ``started_items`` is done with, whatever its end."""
        with self._lock:
            self.in_flight -= count

    def abandon(self) -> int:
        """The run leaves the items still in flight to the database's rollback
        (--shutdown-timeout): they count as rolled back, now and once."""
        with self._lock:
            if not self._abandoned:
                self._abandoned = True
                self.rolled_back += max(0, self.in_flight)
            return self.rolled_back

    def committed(self, items: int, *, chunk: int = 0) -> None:
        """``items`` of the job's committed; ``chunk``: as a chunk of that many
        (see :meth:`chunk`), counted under the same lock."""
        with self._lock:
            self.succeeded += items
            self.commits += 1
            self.last_item_at = time.monotonic()
            if chunk:
                self._chunk(chunk)

    def dry_committed(self, items: int, *, chunk: int = 0) -> None:
        """A dry run's chunk ended well (and was rolled back, as all of it is)."""
        with self._lock:
            self.succeeded += items
            self.last_item_at = time.monotonic()
            if chunk:
                self._chunk(chunk)

    def failure(self, item_repr: str, error_line: str) -> int:
        with self._lock:
            self.failed += 1
            self.last_item_at = time.monotonic()
            if len(self.failures) < MAX_FAILURES_LISTED:
                self.failures.append(ItemFailure(item_repr, error_line))
            return self.failed

    def chunk(self, items: int) -> None:
        """A chunk of ``items`` committed (its size, whatever failed in it)."""
        with self._lock:
            self._chunk(items)

    def _chunk(self, items: int) -> None:
        count, total, low, high = self.chunks
        self.chunks = [count + 1, total + items, min(low, items) if count else items, max(high, items)]

    def chunk_sizes(self) -> dict[str, float] | None:
        with self._lock:
            count, total, low, high = self.chunks
        if not count:
            return None
        return {"min": low, "max": high, "mean": round(total / count, 1)}

    def retry(self, items: int) -> None:
        with self._lock:
            self.retried += items

    def replay(self, items: int) -> None:
        with self._lock:
            self.replayed += items

    def roll_back(self, items: int) -> None:
        with self._lock:
            if not self._abandoned:  # else counted by abandon() already
                self.rolled_back += items

    def skip(self, count: int = 1) -> None:
        with self._lock:
            self.skipped += count

    def items_seconds(self) -> float:
        with self._lock:
            if self.first_item_at is None:
                return 0.0
            return (self.last_item_at or time.monotonic()) - self.first_item_at

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                **{name: getattr(self, name) for name in COUNTS},
                "done": self.succeeded + self.failed,
                "total": self.total,
            }
