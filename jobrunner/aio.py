"""The asyncio execution model: an async job's items as tasks on one event
loop, each chunk's transaction on an AsyncSession of its own.

An async job runs the same run as a threaded one, not a copy of it. The job's
``async def`` hooks are adapted (:func:`adapt`) to the shape the run calls;
whatever calls job code with a session (setup, the items reader, and the
unit of work of ``transaction.py`` with its decisions, fence, resume keys
and isolation of bad items) runs on the loop inside a greenlet
(SQLAlchemy's ``greenlet_spawn``) on the ``sync_session`` of an
AsyncSession. There, a sync call's I/O awaits on the loop, and the job's
coroutine is awaited (``await_``) with that session's AsyncSession. So the
threaded run's guarantees are those of this one: the same code gives them.

What is this module's own: the loop in a thread of its own (:class:`EventLoop`),
the async engine and its sessions (:class:`AsyncDatabase`), the executor
(:class:`Tasks`: ``concurrency`` items in flight, ``workers`` transactions at
once), waiting without stopping the loop (:meth:`EventLoop.blocking`), and
the notice for a job that blocks the loop (:class:`_Watchdog`).

The lock, its heartbeat, history and the work table stay on the sync driver
in threads of their own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import inspect
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from jobrunner import appcode
from jobrunner import db as dbmod
from jobrunner.exceptions import ConfigError, WorkerCrashed
from jobrunner.executor import Producer

ASYNC_EXTRA_HINT = "pip install 'jobrunner[async]'"
BLOCKED_S = 1.0  # a loop stalled this long is said once
TICK_S = 0.1
PULL_BATCH = 256  # items an async items() hands over per hop to the feeding thread
ASYNC_INFO = appcode.ASYNC_SESSION  # sync_session.info: its AsyncSession
OWNER_TASK = "jobrunner_owner_task"

try:
    from sqlalchemy import event
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
    from sqlalchemy.orm import Session
    from sqlalchemy.util import concurrency

    _await: Callable[[Any], Any] = getattr(concurrency, "await_", None) or concurrency.await_only
    greenlet_spawn = concurrency.greenlet_spawn
    import greenlet  # type: ignore[import-untyped]  # noqa: F401  # SQLAlchemy needs it, and says so late

    _MISSING: str | None = None
except ImportError as error:  # pragma: no cover - the extra is installed in the tests
    _MISSING = str(error)


def require(family: str) -> None:
    """Raise one line (exit 2) unless the async extra and the driver for
    ``family`` are installed."""
    driver = {"postgresql": "asyncpg", "sqlite": "aiosqlite", "mysql": "aiomysql"}.get(family)
    missing = _MISSING
    if missing is None and driver is not None:
        try:
            __import__(driver)
        except ImportError as error:
            missing = str(error)
    if missing is not None:
        raise ConfigError(f"an async job needs jobrunner's async extra ({missing}): {ASYNC_EXTRA_HINT}")


class EventLoop:
    """One event loop for the whole run, in a thread of its own (one
    AsyncEngine must not be shared across loops)."""

    def __init__(self, notice: Callable[[str], None], job_path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.ident: int | None = None
        self._thread = threading.Thread(target=self._run, name="jobrunner-loop", daemon=True)
        self._thread.start()
        self._ready.wait()
        self.watchdog = _Watchdog(self, notice, job_path)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.ident = threading.get_ident()
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    def on_loop(self) -> bool:
        return threading.get_ident() == self.ident

    def run(self, awaitable: Any) -> Any:
        """Await ``awaitable`` on the loop from another thread, and return its result."""
        return asyncio.run_coroutine_threadsafe(_awaiting(awaitable), self.loop).result()

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` on the loop, in a greenlet: its sync SQLAlchemy
        calls on async sessions do their I/O there."""
        return self.run(greenlet_spawn(function, *args))

    def await_(self, awaitable: Any) -> Any:
        """Await from sync code: from a greenlet on the loop, or from another thread."""
        if self.on_loop():
            return _await(awaitable)
        return self.run(awaitable)

    def blocking(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)``, which may wait a while (a backoff, an outage, a
        fence in doubt): from the loop, in a thread, so that every other task
        runs on meanwhile."""
        if not self.on_loop():
            return function(*args)
        if function is time.sleep:
            return _await(asyncio.sleep(*args))
        return _await(asyncio.to_thread(function, *args))

    def close(self) -> None:
        self.watchdog.stop()
        if self.loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self.run(self._cancel_the_rest())
            self.run(self.loop.shutdown_asyncgens())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()

    async def _cancel_the_rest(self) -> None:
        """Tasks still pending at the end (the watchdog's ticks) end here, not
        as "Task was destroyed but it is pending"."""
        rest = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)


async def _awaiting(awaitable: Any) -> Any:
    return await awaitable


class _Watchdog:
    """Says once when the job's code kept the loop from running (a
    ``time.sleep`` or a sync driver call inside ``async def``): every item in
    flight waited meanwhile. A task on the loop ticks; a thread watches the
    ticks, and names the job's function the loop thread is in."""

    def __init__(self, loop: EventLoop, notice: Callable[[str], None], job_path: Path) -> None:
        self.owner, self.notice, self.job_path = loop, notice, str(job_path)
        self.ticked = time.monotonic()
        self._stop = threading.Event()
        self._said = False
        asyncio.run_coroutine_threadsafe(self._tick(), loop.loop)
        self._thread = threading.Thread(target=self._watch, name="jobrunner-loop-watch", daemon=True)
        self._thread.start()

    async def _tick(self) -> None:
        while not self._stop.is_set():
            self.ticked = time.monotonic()
            await asyncio.sleep(TICK_S)

    def _watch(self) -> None:
        while not self._stop.wait(TICK_S) and not self._said:
            began = self.ticked
            if time.monotonic() - began < BLOCKED_S:
                continue
            where = self._where()
            while self.ticked == began and not self._stop.wait(TICK_S / 2):
                pass
            if self._stop.is_set() and self.ticked == began:
                return
            self._said = True
            self.notice(
                f"the event loop was blocked for {self.ticked - began - TICK_S:.1f}s{where}, and every item "
                "in flight waited: inside async def, await (asyncio.sleep, the AsyncSession, an async "
                "client), or hand blocking calls to asyncio.to_thread"
            )

    def _where(self) -> str:
        frame = sys._current_frames().get(self.owner.ident or -1)
        while frame is not None:
            if frame.f_code.co_filename == self.job_path:
                return f" in {frame.f_code.co_name}() ({self.job_path}:{frame.f_lineno})"
            frame = frame.f_back
        return ""

    def stop(self) -> None:
        self._stop.set()


# -- the async engine and its sessions ------------------------------------------------
if _MISSING is None:

    class TaskSession(dbmod.ItemSession):
        """The sync half of an async job's sessions (the same rules for job code)."""

    @event.listens_for(TaskSession, "after_begin")
    def _check_task(session: Session, transaction: Any, connection: Any) -> None:
        # "No AsyncSession is used by two tasks": each worker session records
        # the task that made it, and every transaction it begins is checked
        # (SQLAlchemy itself does not always notice such sharing).
        owner = session.info.get(OWNER_TASK)
        if owner is not None and owner is not asyncio.current_task():
            raise RuntimeError("a jobrunner AsyncSession was used by a task other than its owner")


class AsyncDatabase:
    """The async engine for an async job's own sessions, beside the run's
    sync :class:`db.Database` (which keeps the lock and jobrunner's rows)."""

    def __init__(self, database: dbmod.Database, url: str, workers: int, loop: EventLoop) -> None:
        self.database, self.loop = database, loop
        self.family = database.family
        self.is_sqlite = database.is_sqlite
        self.isolation = database.isolation
        url = dbmod.url_for(url, asynchronous=True)
        # The workers' transactions, the items reader and setup(): the pool
        # never grows with --concurrency.
        pool = {"pool_size": workers + 2, "max_overflow": 0, "pool_timeout": 60}
        name = database.name[: dbmod.APP_NAME_MAX]
        if self.family == "sqlite":
            self.async_engine = create_async_engine(
                url, connect_args={"timeout": dbmod.SQLITE_BUSY_TIMEOUT_S}, **pool
            )
            dbmod.sqlite_events(self.async_engine.sync_engine)
        elif self.family == "mysql":
            isolation = dbmod.SQL_ISOLATION[database.isolation]
            args = {"program_name": name, "connect_timeout": 10}
            self.async_engine = create_async_engine(url, isolation_level=isolation, connect_args=args, **pool)
            dbmod.mysql_events(self.async_engine.sync_engine)
        else:
            settings = {"application_name": name, **_server_settings(dbmod.PG_SERVER_OPTIONS)}
            self.async_engine = create_async_engine(
                url,
                isolation_level=dbmod.SQL_ISOLATION[database.isolation],
                connect_args={"server_settings": settings, "timeout": 10},
                **pool,
            )
        self.engine = self.async_engine.sync_engine  # for what listens to engines (a dry run's counts)
        self.factory = async_sessionmaker(
            self.async_engine, sync_session_class=TaskSession, expire_on_commit=False
        )

    def task_session(self, bind: Any = None, **options: Any) -> AsyncSession:
        """A worker task's session: it belongs to the task that asks."""
        session = self.factory(bind=bind, **options) if bind is not None else self.factory(**options)
        session.info[ASYNC_INFO] = session
        session.info[OWNER_TASK] = asyncio.current_task() if self.loop.on_loop() else None
        return session

    def session(self) -> _SyncSide:
        """For setup(): used on the loop, in a greenlet."""
        return _SyncSide(self.loop, self.task_session())

    def reader(self) -> _SyncSide:
        """For items() and count(), used by the feeding thread through the loop:
        as ``db.Database.reader``, READ COMMITTED on a server and a deferred
        BEGIN on SQLite, so that reading never holds the writers back."""
        if self.is_sqlite:
            bind = self.async_engine.execution_options(**{dbmod.BEGIN_OPTION: "DEFERRED"})
        else:
            bind = self.async_engine.execution_options(isolation_level=dbmod.BOOKKEEPING)
        return _SyncSide(self.loop, self.task_session(bind=bind))

    def dispose(self) -> None:
        self.loop.run(self.async_engine.dispose())


class _SyncSide:
    """An AsyncSession's sync half for a ``with`` block, closed through the
    loop whichever thread ends the block."""

    def __init__(self, loop: EventLoop, session: AsyncSession) -> None:
        self.loop, self.async_session = loop, session

    def __enter__(self) -> Session:
        return self.async_session.sync_session

    def __exit__(self, *exc_info: object) -> None:
        self.loop.await_(self.async_session.close())


def _server_settings(options: str) -> dict[str, str]:
    """``-c name=value ...`` (libpq's options) as asyncpg's server_settings."""
    words = options.split()
    pairs = [words[i + 1] for i, word in enumerate(words) if word == "-c" and i + 1 < len(words)]
    return dict(pair.split("=", 1) for pair in pairs)


class OneTransaction:
    """An async dry run's sessions, as ``dryrun.OneTransaction``: one
    connection, one transaction rolled back at the end, a savepoint per
    session. Entered and left on the loop, in a greenlet."""

    def __init__(self, database: AsyncDatabase) -> None:
        self.database = database
        self._connection: Any = None
        self._outer: Any = None

    def __enter__(self) -> OneTransaction:
        engine = self.database.async_engine
        if not self.database.is_sqlite:
            engine = engine.execution_options(isolation_level=dbmod.BOOKKEEPING)
        self._connection = self.database.loop.await_(engine.connect())
        if self.database.family == "mysql":
            from jobrunner.dryrun import refuse_ddl

            event.listen(self._connection.sync_connection, "before_cursor_execute", refuse_ddl, retval=True)
        self._outer = self.database.loop.await_(self._connection.begin())
        return self

    def __exit__(self, *exc_info: object) -> None:
        loop = self.database.loop
        try:
            loop.await_(self._outer.rollback())
        finally:
            loop.await_(self._connection.close())

    def session(self) -> _SyncSide:
        session = self.database.task_session(bind=self._connection, join_transaction_mode="create_savepoint")
        session.info[OWNER_TASK] = None  # one task after another, never two at once
        return _SyncSide(self.database.loop, session)

    reader = session


# -- the job's hooks, in the shape the run calls ------------------------------------------
def adapt(job: Any, loop: EventLoop, app: appcode.AppCode | None = None) -> Any:
    """``job`` with each ``async def`` hook wrapped as a plain function that
    awaits it on the loop, handed the AsyncSession of the session it gets.

    The job's SCOPED_SESSION (an ``async_scoped_session``, scoped to the
    task) and APP_CONTEXT are bound inside the task that runs the hook's
    coroutine, not in the thread that asked for it."""
    hooks = ("items", "setup", "count", "prepare", "process", "process_batch")
    return dataclasses.replace(job, **{h: _sync(loop, getattr(job, h), app) for h in hooks})


def _sync(
    loop: EventLoop, function: Callable[..., Any] | None, app: appcode.AppCode | None
) -> Callable[..., Any] | None:
    if function is None:
        return None

    @functools.wraps(function)
    def call(*args: Any) -> Any:
        session = next((arg for arg in args if isinstance(arg, Session)), None)
        scope = functools.partial(_bound, app, session)
        result = loop.await_(scope(_call_async(function, *(_async_of(arg) for arg in args))))
        if hasattr(result, "__aiter__"):
            return _Pulled(loop, result, scope)
        return result

    return call


async def _call_async(function: Callable[..., Any], *args: Any) -> Any:
    result = function(*args)
    return (await result) if inspect.isawaitable(result) else result


async def _bound(app: appcode.AppCode | None, session: Any, awaitable: Any) -> Any:
    """``awaitable`` with the job's APP_CONTEXT and SCOPED_SESSION (bound to
    ``session``) in place, in the task that awaits it."""
    if app is None:
        return await awaitable
    with contextlib.ExitStack() as scope:
        scope.enter_context(app.task())
        if session is not None:
            scope.enter_context(app.hook(session))
        return await awaitable


def _async_of(value: Any) -> Any:
    if isinstance(value, Session) and ASYNC_INFO in value.info:
        return value.info[ASYNC_INFO]
    return value


class _Pulled(Iterator[Any]):
    """An async iterable (an async items()) read from the feeding thread, a
    batch of items per hop to the loop."""

    def __init__(self, loop: EventLoop, iterable: Any, scope: Callable[[Any], Any]) -> None:
        self.loop, self.iterator, self.scope = loop, iterable.__aiter__(), scope
        self.buffer: list[Any] = []
        self.ended = False

    def __next__(self) -> Any:
        if not self.buffer:
            if self.ended:
                raise StopIteration
            try:
                self.buffer, self.ended = self.loop.await_(self.scope(self._pull()))
            except concurrent.futures.CancelledError:
                raise StopIteration from None  # the loop is closing: the run has stopped feeding
            self.buffer.reverse()
            if not self.buffer:
                raise StopIteration
        return self.buffer.pop()

    async def _pull(self) -> tuple[list[Any], bool]:
        batch: list[Any] = []
        try:
            while len(batch) < PULL_BATCH:
                batch.append(await self.iterator.__anext__())
        except StopAsyncIteration:
            return batch, True
        return batch, False


# -- the executor ---------------------------------------------------------------------
class Tasks:
    """The asyncio executor: chunks taken from the feed become tasks on the
    loop; at most ``concurrency`` items are in flight (those awaiting
    ``prepare`` included) and at most ``workers`` transactions run at once.
    A chunk's task holds one of ``workers`` AsyncSessions for its
    transaction, and no other task uses that session until it is done (as a
    worker thread keeps one Session for the whole run).

    One consumer of the feed (``count``): a dispatcher takes a chunk at once
    when the feed has one, waits for one in a thread of its own otherwise,
    and starts a task per chunk. ``pause()`` is asked before each take, as
    by a worker thread. A distributed run's feed is claimed from instead
    (``claims``): see :meth:`_claiming`.
    """

    count = 1

    def __init__(
        self,
        *,
        loop: EventLoop,
        database: AsyncDatabase,
        workers: int,
        concurrency: int,
        batch_size: int,
        take: Callable[..., list[Any] | None],
        unit: Any,
        pause: Callable[[], bool] | None = None,
        paused: Callable[[], bool] = lambda: False,
        claims: bool = False,
        task_scope: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
        thread_name: str = "jobrunner-tasks",
    ) -> None:
        self.loop, self.database, self.unit = loop, database, unit
        self.workers = workers
        self.chunks_in_flight = max(1, concurrency // max(1, batch_size))
        self.take, self.pause = take, pause
        self.paused = paused  # True while pause() would wait (an outage): ask it in the taker thread
        # A distributed run's feed claims a chunk inside the chunk's own
        # transaction: then each of ``workers`` tasks takes on its session.
        self.claims = claims
        self.task_scope = task_scope  # entered for the life of each task that runs job code (APP_CONTEXT)
        self.thread_name = thread_name
        prepare = getattr(unit.job, "prepare", None)
        self.awaits_prepare = prepare is not None and inspect.iscoroutinefunction(inspect.unwrap(prepare))
        self._taker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{thread_name}-take")
        self._done: concurrent.futures.Future[None] | None = None
        self._producer = Producer(f"{thread_name}-items")
        self._error: BaseException | None = None

    def start(self, produce: Callable[[], None] | None = None) -> None:
        self._done = asyncio.run_coroutine_threadsafe(self._main(), self.loop.loop)
        self._producer.start(produce)

    def join_producer(self, timeout: float) -> None:
        self._producer.join(timeout)

    def alive(self) -> bool:
        return self._done is not None and not self._done.done()

    def wait(self, timeout: float) -> bool:
        """True once every task has finished; raises if one crashed."""
        assert self._done is not None, "started first"
        try:
            self._done.result(timeout)
        except concurrent.futures.TimeoutError:
            return False
        except Exception as error:
            raise WorkerCrashed(
                f"internal error: an item task failed: {error!r} (rerun with --debug for the traceback)"
            ) from error
        self._taker.shutdown(wait=False)
        return True

    def _next(self) -> list[Any] | None:
        if self.pause is not None and not self.pause():
            return None
        return self.take(None)

    async def _take(self, loop: asyncio.AbstractEventLoop) -> list[Any] | None:
        """The next chunk: at once when the feed has one and the database is
        not away (no thread hop), else waited for in the taker thread."""
        if not self.paused():
            ready = self.take(None, wait=False)
            if ready is None or ready:
                return ready
        return await loop.run_in_executor(self._taker, self._next)

    async def _main(self) -> None:
        if self.claims:
            await self._claiming()
            return
        lanes = asyncio.Semaphore(self.chunks_in_flight)
        # A worker's session, as a worker thread keeps one: W of them, each
        # used by one task at a time (the task that holds it), never two.
        self._sessions: asyncio.Queue[AsyncSession | None] = asyncio.Queue()
        for _ in range(self.workers):
            self._sessions.put_nowait(None)
        running: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()

        def ended(task: asyncio.Task[None]) -> None:
            running.discard(task)
            lanes.release()
            if not task.cancelled() and task.exception() is not None and self._error is None:
                self._error = task.exception()

        try:
            while self._error is None:
                await lanes.acquire()
                chunk = await self._take(loop)
                if chunk is None:
                    break
                task = asyncio.create_task(self._chunk(chunk))
                running.add(task)
                task.add_done_callback(ended)
            while running:
                await asyncio.wait(set(running))
        finally:
            while not self._sessions.empty():
                session = self._sessions.get_nowait()
                if session is not None:
                    await session.close()
        if self._error is not None:
            raise self._error

    async def _prepared(self, chunk: list[Any]) -> list[Any]:
        """The chunk's ``prepare`` calls: an ``async def`` prepare for each
        item of a chunk at once (each awaits on its own, so a chunk of 100
        items that each wait 100 ms is ready in about 100 ms, not 10 s); the
        items keep their order, and an item whose prepare raised is failed
        alone (see ``Unit.prepare``)."""
        if len(chunk) == 1 or not self.awaits_prepare:
            return await greenlet_spawn(self.unit.prepare, chunk)
        parts = [asyncio.ensure_future(greenlet_spawn(self.unit.prepare, [entry])) for entry in chunk]
        try:
            done = await asyncio.gather(*parts)
        except BaseException:
            # Cancelled (the run stops), or one part failed beyond the job's
            # own error: end the others, and settle those that had finished
            # (a part that raised settled itself).
            for part in parts:
                part.cancel()
            ended = await asyncio.gather(*parts, return_exceptions=True)
            self.unit.progress.settled(sum(1 for result in ended if not isinstance(result, BaseException)))
            raise
        return [entry for part in done for entry in part]

    async def _claiming(self) -> None:
        """A distributed run: ``workers`` tasks, each looping as a worker
        thread does (claim a chunk in its session's transaction, then its
        items), so that a claim commits or rolls back with its chunk. Items in
        flight are then at most ``workers`` chunks, each holding its
        connection from its claim to its commit."""
        tasks = [asyncio.create_task(self._claimer()) for _ in range(self.workers)]
        done = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [result for result in done if isinstance(result, BaseException)]
        if errors:
            raise errors[0]

    async def _claimer(self) -> None:
        with self.task_scope():
            await self._claim_all()

    async def _claim_all(self) -> None:
        session = self.database.task_session()
        try:
            while True:
                if self.paused() and self.pause is not None and not await asyncio.to_thread(self.pause):
                    return
                chunk = await greenlet_spawn(self.take, session.sync_session)
                if chunk is None:
                    return
                await greenlet_spawn(self.unit, session.sync_session, chunk)
        finally:
            await session.close()

    async def _chunk(self, chunk: list[Any]) -> None:
        with self.task_scope():
            await self._prepare_and_transact(chunk)

    async def _prepare_and_transact(self, chunk: list[Any]) -> None:
        work = await self._prepared(chunk)  # holds no connection
        if not work:
            self.unit.transact(None, chunk, work)
            return
        session = await self._sessions.get()
        if session is None:
            session = self.database.task_session()
        session.info[OWNER_TASK] = asyncio.current_task()
        try:
            await greenlet_spawn(self.unit.transact, session.sync_session, chunk, work)
        finally:
            session.info[OWNER_TASK] = None
            self._sessions.put_nowait(session)
