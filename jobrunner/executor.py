"""The threading model, all of it: a ThreadPoolExecutor of worker loops, one
Session per worker thread, each taking chunks of items from a feed, and the
producer thread that fills the feed from ``items()``.

How "no Session crosses threads" is enforced: a worker's session is created
inside its own loop, lives in a local variable of that loop, and is closed by
that loop before the thread finishes; it is never stored anywhere another
thread can reach. The session factory also records each session's owner
thread and refuses a transaction begun from any other (see ``db.py``). Items
reach the workers as plain values; ORM instances are refused (see
``runner.py``) because they carry their session with them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any, Generic, Protocol, TypeVar

from jobrunner.exceptions import WorkerCrashed

S = TypeVar("S")


def in_this_thread(function: Callable[..., Any], *args: Any) -> Any:
    """How a wait is waited (a backoff, an outage, the work table's poll) in
    a worker thread: right here. An async run's loop waits in a thread of
    its own instead (``aio.EventLoop.blocking``), and is handed that."""
    return function(*args)


class Executor(Protocol):
    """What the run needs of its executor: threads (:class:`Workers`), or none (:class:`Serial`)."""

    count: int

    def start(self, produce: Callable[[], None] | None = None) -> None: ...
    def join_producer(self, timeout: float) -> None: ...
    def alive(self) -> bool: ...
    def wait(self, timeout: float) -> bool: ...


class Serial:
    """No threads at all: ``produce`` does the work in the calling thread (a
    dry run, whose one transaction lives on one connection)."""

    count = 1

    def __init__(self, run: Callable[[Callable[[], None]], None] | None = None) -> None:
        self.run = run  # how to call produce (on an async job's loop)

    def start(self, produce: Callable[[], None] | None = None) -> None:
        if produce is not None:
            if self.run is not None:
                self.run(produce)
            else:
                produce()

    def join_producer(self, timeout: float) -> None:
        pass

    def alive(self) -> bool:
        return True

    def wait(self, timeout: float) -> bool:
        return True


class Producer:
    """The thread that fills the feed from ``items()``. A daemon: a producer
    blocked inside ``items()`` when the run stops must not keep the process
    alive."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._thread: threading.Thread | None = None

    def start(self, produce: Callable[[], None] | None) -> None:
        if produce is not None:
            self._thread = threading.Thread(target=produce, name=self.name, daemon=True)
            self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)


class Workers(Generic[S]):
    """``workers`` threads, each looping: ``take(session)`` a chunk, ``work(session, chunk)``.

    ``take`` returns None when there is no more work (the feed ended, or the
    run stopped). ``pause()``, if given, runs before each take: a worker
    waits there while the database is away instead of taking new work.
    """

    def __init__(
        self,
        *,
        workers: int,
        open_session: Callable[[], S],
        close_session: Callable[[S], None],
        take: Callable[[S], list[Any] | None],
        work: Callable[[S, list[Any]], None],
        pause: Callable[[], bool] | None = None,
        thread_name: str = "jobrunner-worker",
        thread_scope: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> None:
        self.count = workers
        self.open_session = open_session
        self.close_session = close_session
        self.take = take
        self.work = work
        self.pause = pause
        self.thread_name = thread_name
        self.thread_scope = thread_scope  # entered for the whole life of each worker (APP_CONTEXT)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=thread_name)
        self._futures: list[Future[None]] = []
        self._producer = Producer(f"{thread_name}-items")

    def start(self, produce: Callable[[], None] | None = None) -> None:
        """Start the workers, and ``produce`` (which feeds them) in a thread of its own."""
        wanted, self._futures = self.count, []
        try:
            for _ in range(wanted):
                self._futures.append(self._pool.submit(self._loop))
        except RuntimeError as error:  # "can't start new thread"
            # The loops that did start end once their feed is finished (the
            # caller's cleanup): consumers are only those.
            self.count = len(self._futures)
            self._pool.shutdown(wait=False)
            raise WorkerCrashed(
                f"could start only {self.count} of {wanted} worker threads ({error}): use fewer workers"
            ) from error
        self._pool.shutdown(wait=False)  # threads end with their loops; nothing else is submitted
        self._producer.start(produce)

    def join_producer(self, timeout: float) -> None:
        self._producer.join(timeout)

    def alive(self) -> bool:
        return not all(f.done() for f in self._futures)

    def wait(self, timeout: float) -> bool:
        """True once every worker has finished; raises if one crashed."""
        done, pending = wait(self._futures, timeout=timeout, return_when=FIRST_EXCEPTION)
        for future in done:
            error = future.exception()
            if error is not None:
                raise WorkerCrashed(
                    f"internal error: a worker thread failed: {error!r} "
                    "(rerun with --debug for the traceback)"
                ) from error
        return not pending

    def _loop(self) -> None:
        with self.thread_scope():
            self._work_loop()

    def _work_loop(self) -> None:
        session = self.open_session()
        try:
            while True:
                if self.pause is not None and not self.pause():
                    return
                chunk = self.take(session)
                if chunk is None:
                    return
                self.work(session, chunk)
        finally:
            self.close_session(session)
