"""Finding and loading job modules from the jobs folder.

A job is ``<jobs folder>/<name>.py`` defining ``items(ctx, session)`` and
``process(ctx, session, item)`` (or ``process_batch(ctx, session, items)``);
optional hooks are listed in ``HOOKS``, and module-level defaults for its
settings in ``config.JOB_MODULE_DEFAULTS``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import re
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from jobrunner.config import JOB_MODULE_DEFAULTS
from jobrunner.exceptions import JobError

NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
# setup(ctx, session): once, before items(), in its own committed transaction
# count(ctx, session) -> int: the number of items, for the progress bar
# item_key(item) -> str: makes the job resumable (--resume)
# prepare(ctx, item) -> value: in the worker, before the item's transaction;
#   process gets the value (slow work that needs no database goes here)
# process_batch(ctx, session, items): a whole chunk at once (--batch-size > 1)
HOOKS = ("setup", "count", "item_key", "prepare", "process", "process_batch")


@dataclasses.dataclass(frozen=True)
class JobInfo:
    """What ``jobrunner list`` shows: read from the source, never imported."""

    name: str
    path: Path
    summary: str


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    path: Path
    module: ModuleType
    items: Callable[..., Iterable[Any]]
    process: Callable[..., None] | None = None
    setup: Callable[..., None] | None = None
    count: Callable[..., int] | None = None
    item_key: Callable[[Any], str] | None = None
    prepare: Callable[..., Any] | None = None
    process_batch: Callable[..., None] | None = None
    # module-level defaults for settings ({"batch_size": 100}), see config.JOB_MODULE_DEFAULTS
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    # process (or process_batch) is ``async def``: the run's tasks on one event
    # loop, an AsyncSession each (see aio.py)
    is_async: bool = False


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise JobError(f"invalid job name {name!r}: use letters, digits, '_' and '-', not starting with '-'")
    return name


def discover(jobs_path: Path) -> list[JobInfo]:
    """Every job module in the folder, by name. Modules starting with '_' are helpers."""
    if not jobs_path.is_dir():
        raise JobError(f"jobs folder {jobs_path} does not exist")
    found = []
    for path in sorted(jobs_path.glob("*.py")):
        if path.stem.startswith("_") or not NAME_PATTERN.fullmatch(path.stem):
            continue
        found.append(JobInfo(path.stem, path, _summary(path)))
    return found


def _summary(path: Path) -> str:
    # Parsing, not importing: listing jobs must not run their code (or pay
    # for importing SQLAlchemy).
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError) as exc:
        return f"(cannot be parsed: {exc.__class__.__name__} at line {getattr(exc, 'lineno', '?')})"
    except OSError as exc:
        return f"(cannot be read: {exc.strerror})"
    doc = ast.get_docstring(tree) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def load(jobs_path: Path, name: str) -> Job:
    check_name(name)
    path = jobs_path / f"{name}.py"
    if not path.is_file():
        known = ", ".join(j.name for j in discover(jobs_path)) if jobs_path.is_dir() else ""
        hint = f" (known jobs: {known})" if known else ""
        raise JobError(f"unknown job {name!r}: no file {path}{hint}")

    module_name = f"jobrunner_jobs.{name.replace('-', '_')}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise JobError(f"job {name!r}: {path} cannot be loaded as a module")
    module = importlib.util.module_from_spec(spec)
    # Jobs may import helpers that sit beside them (jobs/_common.py), and the
    # application's own packages beside the jobs folder (myapp/ next to jobs/),
    # the latter after everything installed, so they never shadow a library.
    folder = str(jobs_path.resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    parent = str(jobs_path.resolve().parent)
    if parent not in sys.path:
        sys.path.append(parent)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # any failure to import is the job's
        sys.modules.pop(module_name, None)
        raise JobError(f"job {name!r} failed to import: {_where(exc, path)}") from exc

    missing = [] if callable(getattr(module, "items", None)) else ["items()"]
    if not callable(getattr(module, "process", None)) and not callable(
        getattr(module, "process_batch", None)
    ):
        missing.append("process() or process_batch()")
    if missing:
        raise JobError(f"job {name!r} ({path}) does not define {' and '.join(missing)}")
    hooks = {}
    for hook in HOOKS:
        value = getattr(module, hook, None)
        if value is not None and not callable(value):
            raise JobError(f"job {name!r} ({path}): {hook} must be a function")
        hooks[hook] = value
    is_async = _check_kind(name, path, hooks, module.items)
    defaults = {
        key: getattr(module, constant)
        for constant, key in JOB_MODULE_DEFAULTS.items()
        if getattr(module, constant, None) is not None
    }
    return Job(name, path, module, module.items, defaults=defaults, is_async=is_async, **hooks)


def _check_kind(name: str, path: Path, hooks: dict[str, Any], items: Any) -> bool:
    """True for an async job. Its hooks that get a session are ``async def``
    (items() may be an async generator), since they are handed an
    AsyncSession; prepare() may be either; item_key() stays plain. A job
    that mixes the two kinds is refused here rather than half-run."""
    workers = [hooks[h] for h in ("process", "process_batch") if hooks[h] is not None]
    kinds = {inspect.iscoroutinefunction(f) for f in workers}
    if len(kinds) > 1:
        raise JobError(
            f"job {name!r} ({path}): process() and process_batch() must both be async def, or neither"
        )
    is_async = kinds == {True}
    session_hooks = {"setup": hooks["setup"], "count": hooks["count"], "items": items}
    for hook, function in session_hooks.items():
        if function is None:
            continue
        async_kind = inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function)
        if async_kind != is_async:
            want = "async def" if is_async else "a plain def"
            kind = "an async job" if is_async else "a job whose process() is a plain def"
            raise JobError(f"job {name!r} ({path}): {hook}() must be {want} in {kind}")
    key = hooks["item_key"]
    if key is not None and (inspect.iscoroutinefunction(key) or inspect.isasyncgenfunction(key)):
        raise JobError(f"job {name!r} ({path}): item_key() must be a plain def (it is asked often, and fast)")
    prepare = hooks["prepare"]
    if prepare is not None and inspect.iscoroutinefunction(prepare) and not is_async:
        raise JobError(f"job {name!r} ({path}): prepare() is async def, so process() must be too")
    return is_async


def _where(exc: BaseException, path: Path) -> str:
    """``file:line: ExcType: message``, pointing into the job's own file."""
    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, SyntaxError):
        return f"{exc.filename or path}:{exc.lineno}: SyntaxError: {exc.msg}"
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if Path(frame.filename) == path:
            return f"{path}:{frame.lineno}: {message}"
    return f"{path}: {message}"
