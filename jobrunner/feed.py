"""Where items come from and how they reach the workers.

A feed hands each worker a chunk of up to ``batch_size`` items. This module
holds the in-memory feed of a single-process run: ``items()`` is consumed
lazily by a producer thread into a bounded queue, so a generator of
millions of items keeps memory flat. ``worktable.py`` holds the other feed,
the database table that the processes of a distributed run claim from.

Both hand out :data:`Entry` pairs ``(item, token)``: the token is what a
feed needs to claim the item again inside a transaction (a work-table row
number), None in memory.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from jobrunner.exceptions import ItemRefused

Entry = tuple[Any, Any]
_END = object()
PUT_POLL_S = 0.05
MIN_CAPACITY = 32


class Feed(Protocol):
    """Both halves of where items go: fed in by the producer, taken by the workers."""

    # True when ``take`` claims a chunk inside the worker's transaction (the
    # work table): an item of it is settled in that transaction, or after it.
    claims_in_transaction: bool

    # -- the producer's side
    def feed_in(self, items: Iterable[Any], accept: Callable[[Any], bool], alive: Callable[[], bool]) -> None:
        """Feed ``items`` (lazily) until they end, the run stops or the workers are gone."""

    def finish(self, consumers: int) -> None:
        """Feeding has ended, fed whole or not: the workers finish what was fed."""

    # -- the workers' side
    def take(self, session: Any, limit: int) -> list[Entry] | None:
        """Up to ``limit`` entries, at least one; None when there is no more work."""

    def reclaim(self, session: Any, chunk: list[Entry]) -> list[Entry]:
        """At the start of a retry: the entries of ``chunk`` still ours to do."""

    def settle_failure(self, token: Any, item: Any, item_repr: str, error_line: str) -> bool:
        """An item failed alone: record it; False if another process holds it now."""

    def record_failures(
        self, session: Any, failures: list[tuple[Any, Any, str, str]], *, whole: bool = False
    ) -> None:
        """Items of a chunk that failed alone, (token, item, repr, error line):
        recorded in the chunk's own transaction, which still holds their claim.
        ``whole``: they are all of the chunk, which commits none of the job's work."""


class MemoryFeed:
    """A bounded queue that wakes the producer only at a low-water mark.

    With one wake-up per item (queue.Queue(maxsize)), the producer thread
    competes for the GIL on every item; on SQLite, where writers take turns,
    that stretches each writer's turn (measured: 1.13x the hand-written
    script's wall time at 4 workers, 1.03x with this queue). Refilling in
    bursts once the queue is down to a quarter costs one wake-up per about
    ``3/4 * capacity`` items. With ``capacity = workers * batch_size`` queued,
    at most ``2 * workers * batch_size`` items are in flight (queued or running),
    and never fewer than ``2 * MIN_CAPACITY``: with a queue of four at batch 1
    and 4 workers, the refills alone cost 5-13% of items/s against a floor of
    32 (PostgreSQL fsync on and SQLite, measured side by side; neutral at 1 worker).

    Once ``stop`` is set, ``take`` hands out nothing more: queued items are
    dropped, never started.
    """

    claims_in_transaction = False

    def __init__(self, capacity: int, stop: threading.Event) -> None:
        capacity = max(capacity, MIN_CAPACITY)
        self.capacity = capacity
        self.low_water = capacity // 4
        self.stop = stop
        self._items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._queued = 0
        self._room = threading.Condition(threading.Lock())
        self._closed = False

    # -- the producer's side -------------------------------------------------
    def put(self, item: Any, alive: Callable[[], bool] = lambda: True) -> bool:
        """Queue one item, waiting for room; False once the run stops or no
        worker is left to take it."""
        with self._room:
            while self._queued >= self.capacity:
                if self.stop.is_set() or not alive():
                    return False
                self._room.wait_for(lambda: self._queued <= self.low_water, PUT_POLL_S)
            if self.stop.is_set():
                return False
            self._queued += 1
        self._items.put((item, None))
        return True

    def close(self, consumers: int) -> None:
        """No more items: one end marker per consumer (never blocks)."""
        with self._room:
            self._closed = True
        for _ in range(consumers):
            self._items.put(_END)

    def feed_in(self, items: Iterable[Any], accept: Callable[[Any], bool], alive: Callable[[], bool]) -> None:
        produce(self, items, accept=accept, alive=alive)

    def finish(self, consumers: int) -> None:
        self.close(consumers)

    # -- the workers' side ---------------------------------------------------
    def take(self, session: Any, limit: int, *, wait: bool = True) -> list[Entry] | None:
        """Up to ``limit`` entries; None at the end (or once the run stops).
        ``wait=False``: ``[]`` rather than wait for the first (an event loop
        asks so, and waits in a thread only when there is nothing yet)."""
        if wait:
            entry = self._items.get()
        else:
            try:
                entry = self._items.get_nowait()
            except queue.Empty:
                return [] if not self.stop.is_set() else None
        if entry is _END or self.stop.is_set():
            return None
        chunk = [entry]
        while len(chunk) < limit:
            try:
                entry = self._items.get_nowait()
            except queue.Empty:
                break
            if entry is _END:
                self._items.put(_END)  # someone else's: a chunk is not an ending
                break
            chunk.append(entry)
        self._taken(len(chunk))
        return chunk

    def reclaim(self, session: Any, chunk: list[Entry]) -> list[Entry]:
        return chunk

    def settle_failure(self, token: Any, item: Any, item_repr: str, error_line: str) -> bool:
        return True  # nobody else can hold it

    def record_failures(
        self, session: Any, failures: list[tuple[Any, Any, str, str]], *, whole: bool = False
    ) -> None:
        pass  # failures live in the run's Counters

    def _taken(self, count: int) -> None:
        with self._room:
            before = self._queued
            self._queued -= count
            if before > self.low_water >= self._queued:
                self._room.notify()


class ItemFilter:
    """What may become an item: resumed keys are skipped, ORM instances refused.

    An ORM instance belongs to the session that loaded it, the items reader's,
    which lives in the producer thread; a worker must never touch it.
    """

    def __init__(
        self,
        skip_keys: frozenset[str],
        item_key: Callable[[Any], Any] | None,
        on_skip: Callable[[], None],
        taken_over: frozenset[str] = frozenset(),
    ):
        self.skip_keys = skip_keys  # committed by the runs this one resumes: skipped, and counted
        self.taken_over = taken_over  # in the work table already, this run's to do: not fed twice
        self.item_key = item_key
        self.on_skip = on_skip

    def __call__(self, item: Any) -> bool:
        if (self.skip_keys or self.taken_over) and self.item_key is not None:
            key = str(self.item_key(item))
            if key in self.skip_keys:
                self.on_skip()
                return False
            if key in self.taken_over:
                return False
        if getattr(type(item), "_sa_class_manager", None) is not None:
            raise ItemRefused(
                f"items() yielded an ORM instance ({type(item).__name__}); yield its "
                "primary key or a plain tuple instead, since ORM objects cannot cross threads"
            )
        return True


def produce(
    feed: MemoryFeed,
    items: Iterable[Any],
    *,
    accept: Callable[[Any], bool],
    alive: Callable[[], bool],
) -> None:
    """Feed ``items`` (lazily) until they end, the run stops or the workers
    are gone. ``accept(item)`` may skip an item (False) or refuse it (raise)."""
    for item in items:
        if not accept(item):
            continue
        if not feed.put(item, alive):
            return
