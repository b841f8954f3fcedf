"""The threading model, all of it: a ThreadPoolExecutor of worker loops, one
Session per worker thread, and a bounded queue of items in flight.

How "no Session crosses threads" is enforced: a worker's session is created
inside its own loop, lives in a local variable of that loop, and is closed by
that loop before the thread finishes; it is never stored anywhere another
thread can reach. The session factory also records each session's owner
thread and refuses a transaction begun from any other (see ``db.py``). Items
come from the producer as plain values; ORM instances are refused (see
``runner.py``) because they carry their session with them.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Generic, TypeVar

S = TypeVar("S")
_DONE = object()
PUT_POLL_S = 0.05


class WorkerCrashed(RuntimeError):
    """A worker loop died of an error outside any item (a jobrunner bug)."""


class _InFlight:
    """A bounded queue that wakes the producer only at a low-water mark.

    With one wake-up per item (queue.Queue(maxsize)), the producer thread
    competes for the GIL on every item; on SQLite, where writers take turns,
    that stretches each writer's turn (measured: 1.13x the hand-written
    script's wall time at 4 workers, 1.03x with this queue). Refilling in
    bursts once the queue is down to a quarter costs one wake-up per about
    ``3 * workers / 4`` items and still keeps at most ``2 * workers`` items in
    flight (queued or running).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.low_water = capacity // 4
        self._items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._queued = 0
        self._room = threading.Condition(threading.Lock())

    def put(self, item: Any, timeout: float) -> bool:
        with self._room:
            if self._queued >= self.capacity and not self._room.wait_for(
                lambda: self._queued <= self.low_water, timeout
            ):
                return False
            self._queued += 1
        self._items.put(item)
        return True

    def force_put(self, item: Any) -> None:
        with self._room:
            self._queued += 1
        self._items.put(item)

    def get(self) -> Any:
        item = self._items.get()
        with self._room:
            self._queued -= 1
            if self._queued == self.low_water:
                self._room.notify()
        return item


class FanOut(Generic[S]):
    """Feed ``items`` to ``workers`` threads, each calling ``work(session, item)``.

    ``stop`` is checked before each item is fed and before each queued item is
    started: once it is set, nothing new starts and the queued items are
    dropped. At most ``2 * workers`` items are in flight (queued or running).
    """

    def __init__(
        self,
        *,
        workers: int,
        open_session: Callable[[], S],
        close_session: Callable[[S], None],
        work: Callable[[S, Any], None],
        stop: threading.Event,
        thread_name: str = "jobrunner-worker",
    ) -> None:
        self.workers = workers
        self.open_session = open_session
        self.close_session = close_session
        self.work = work
        self.stop = stop
        self.thread_name = thread_name
        self.producer_error: Exception | None = None
        self._queue = _InFlight(capacity=workers)

    def run(self, items: Iterable[Any], *, drain_timeout: float | None = None) -> bool:
        """Process everything; return False if workers were still busy after
        ``drain_timeout`` seconds past a stop (they are abandoned, still running).

        If iterating ``items`` raises, feeding stops, the items already fed
        are finished, and the exception is kept in ``producer_error``.
        """
        executor = ThreadPoolExecutor(self.workers, thread_name_prefix=self.thread_name)
        futures = [executor.submit(self._loop) for _ in range(self.workers)]
        try:
            for item in items:
                if self.stop.is_set() or not self._put(item, futures):
                    break
        except Exception as error:  # noqa: BLE001 - reported by the caller
            self.producer_error = error
        finally:
            for _ in futures:
                self._queue.force_put(_DONE)  # never blocks: stuck workers must not hold us
            executor.shutdown(wait=False)
        return self._drain(futures, drain_timeout)

    def _drain(self, futures: list, drain_timeout: float | None) -> bool:
        # Polls rather than blocks: a stop (a signal) can arrive while we wait,
        # and from then on the in-flight items get ``drain_timeout`` seconds.
        stopped_at: float | None = None
        while True:
            done, pending = wait(futures, timeout=PUT_POLL_S * 4)
            if not pending:
                break
            if self.stop.is_set() and drain_timeout is not None:
                stopped_at = stopped_at or time.monotonic()
                if time.monotonic() - stopped_at > drain_timeout:
                    return False
        for future in done:
            error = future.exception()
            if error is not None:
                raise WorkerCrashed(f"a worker thread failed: {error!r}") from error
        return True

    def _put(self, item: Any, futures: list) -> bool:
        # Bounded: blocks while the queue is full, but wakes up to notice a
        # stop or dead workers, so the producer can never hang on them.
        while not self._queue.put(item, timeout=PUT_POLL_S):
            if self.stop.is_set() or all(f.done() for f in futures):
                return False
        return True

    def _loop(self) -> None:
        session = self.open_session()
        try:
            while True:
                item = self._queue.get()
                if item is _DONE:
                    return
                if self.stop.is_set():
                    continue  # drained, never started
                self.work(session, item)
        finally:
            self.close_session(session)
