"""Application code inside an item: the job's session registry and app context.

Most batch jobs call the application's own service functions, and those find
their session through a registry (``Session = scoped_session(...)``,
Flask-SQLAlchemy's ``db.session``) rather than taking it as an argument. A
job module that sets ``SCOPED_SESSION = <its scoped_session>`` gets, in every
hook jobrunner calls with a session (``setup``, ``items``, ``count``,
``process``, ``process_batch``), a registry that returns exactly that
session, in every thread; between hooks and after the run it holds nothing
of jobrunner's. ``APP_CONTEXT = <a callable returning a context manager>``
(Flask: ``app.app_context``) is entered once in each thread that runs job
code, for as long as it runs it. An async job's registry is an
``async_scoped_session`` scoped to the task: it is bound inside the task that
runs each hook (see ``aio.adapt``), and APP_CONTEXT is entered once in each
task that runs job code (a chunk's task, or a distributed run's claimer for
its whole life; see ``aio.Tasks``).

The session is jobrunner's item session (``db.ItemSession``), so a service's
``Session.commit()`` does not end the item's transaction, and its
``rollback()`` undoes the item's work and fails the item. ``Session.remove()``
closes the item's session: the item's work is undone and the item fails;
until the hook returns, the registry then hands out the item's session again
(never a session of the application's own, outside the item's transaction).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.orm import scoped_session

from jobrunner import redaction
from jobrunner.exceptions import JobError


class AppCode:
    """A job's SCOPED_SESSION and APP_CONTEXT, bound to jobrunner's sessions."""

    def __init__(self, name: str, registry: Any, app_context: Callable[[], Any] | None) -> None:
        self.is_async = registry is not None and _is_async_registry(registry)
        if registry is not None and not isinstance(registry, scoped_session) and not self.is_async:
            raise JobError(
                f"job {name!r}: SCOPED_SESSION must be a sqlalchemy.orm.scoped_session "
                f"(Flask-SQLAlchemy: db.session), or an async_scoped_session for an async job, "
                f"not {type(registry).__name__}"
            )
        if app_context is not None and not callable(app_context):
            raise JobError(f"job {name!r}: APP_CONTEXT must be a callable returning a context manager")
        self.name = name
        self.registry = registry
        self.app_context = app_context
        # The item session of the hook running in this thread (or task: an
        # async job's hooks run in tasks, each with a context of its own).
        self._current: contextvars.ContextVar[Any] = contextvars.ContextVar("jobrunner_item_session")
        self._createfunc: Callable[[], Any] | None = None

    @classmethod
    def of(cls, job: Any) -> AppCode | None:
        registry = getattr(job.module, "SCOPED_SESSION", None)
        app_context = getattr(job.module, "APP_CONTEXT", None)
        if registry is None and app_context is None:
            return None
        return cls(job.name, registry, app_context)

    # -- at start: one database, one bind ---------------------------------------------
    def check(self, database_url: str) -> None:
        """Refuse, in one line, an application whose registry or Flask config
        names another database than the run's, or several (binds): its code
        would run on a connection outside the item's transaction."""
        if self.registry is None:
            return
        with self.thread():
            theirs = _registry_url(self.name, self.registry)
        if theirs is not None and not _same_database(theirs, database_url):
            raise JobError(
                f"job {self.name!r}: SCOPED_SESSION is bound to {redaction.redact(theirs)}, but the run's "
                f"database is {redaction.redact(database_url)}: the job's items run on the run's database "
                "(--database-url, database_url), so give both the same URL"
            )

    # -- while the run runs -------------------------------------------------------------
    @contextlib.contextmanager
    def thread(self) -> Iterator[None]:
        """The application's context, for a thread that runs job code."""
        if self.app_context is None:
            yield
            return
        with self.app_context():
            yield

    @contextlib.contextmanager
    def task(self) -> Iterator[None]:
        """The application's context, for an asyncio task that runs job code:
        entered once, however many hooks the task awaits inside it."""
        if _IN_APP_CONTEXT.get():
            yield
            return
        token = _IN_APP_CONTEXT.set(True)
        try:
            with self.thread():
                yield
        finally:
            _IN_APP_CONTEXT.reset(token)

    @contextlib.contextmanager
    def hook(self, session: Any) -> Iterator[None]:
        """The registry returns ``session`` while a hook runs on it."""
        if self.registry is None:
            yield
            return
        if self.is_async:  # the AsyncSession whose sync half the hook was given
            session = session.info.get(ASYNC_SESSION, session)
        registry = self.registry.registry
        before = registry() if registry.has() else None
        token = self._current.set(session)
        registry.set(session)
        try:
            yield
        finally:
            self._current.reset(token)
            if before is not None:
                registry.set(before)
            else:
                registry.clear()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """For the run: a registry emptied by the job's ``remove()`` mid-hook
        makes the item's session again, not one of the application's."""
        if self.registry is None:
            yield
            return
        registry = self.registry.registry
        original = registry.createfunc

        def create() -> Any:
            current = self._current.get(None)
            return current if current is not None else original()

        registry.createfunc = create
        try:
            yield
        finally:
            registry.createfunc = original


# True in a task (each has a context of its own) that has entered APP_CONTEXT.
_IN_APP_CONTEXT: contextvars.ContextVar[bool] = contextvars.ContextVar("jobrunner_app_context", default=False)

ASYNC_SESSION = "jobrunner_async_session"  # sync_session.info: its AsyncSession (see aio.py)


def _is_async_registry(registry: Any) -> bool:
    try:
        from sqlalchemy.ext.asyncio import async_scoped_session
    except ImportError:  # pragma: no cover - without the async extra there is no such registry
        return False
    return isinstance(registry, async_scoped_session)


def _registry_url(name: str, registry: scoped_session[Any]) -> str | None:
    """The URL the application's registry would connect to, if it says."""
    factory = registry.session_factory
    db = factory.kw.get("db")
    if db is not None and hasattr(db, "engines"):  # Flask-SQLAlchemy 3
        try:
            engines = db.engines
        except RuntimeError as error:  # outside an application context
            raise JobError(
                f"job {name!r}: SCOPED_SESSION is Flask-SQLAlchemy's db.session: set APP_CONTEXT = "
                f"app.app_context as well ({error})"
            ) from None
        binds = sorted(key for key in engines if key is not None)
        if binds:
            raise JobError(
                f"job {name!r}: the Flask app has several database binds ({', '.join(binds)}): jobrunner "
                "runs every item on one database, so a model with __bind_key__ would run on another "
                "connection, outside the item's transaction; run jobs for one bind at a time"
            )
        default = engines.get(None)
        return None if default is None else default.url.render_as_string(hide_password=False)
    bind = factory.kw.get("bind")
    engine = getattr(bind, "engine", bind)
    url = getattr(engine, "url", None)
    return None if url is None else url.render_as_string(hide_password=False)


def _same_database(a: str, b: str) -> bool:
    """Same server and database (drivers and passwords aside)."""
    x, y = make_url(a), make_url(b)
    if x.get_backend_name() != y.get_backend_name():
        return False
    if x.get_backend_name() == "sqlite":
        return os.path.realpath(x.database or "") == os.path.realpath(y.database or "")
    return (x.host, x.port, x.database, x.username) == (y.host, y.port, y.database, y.username)
