"""Prometheus textfile metrics, for node_exporter's textfile collector.

The file is written atomically (a temporary file renamed into place), so the
collector never reads half a file. ``jobrunner_items_total`` is a counter:
each run adds to the values already in the file, under an exclusive lock on
``<file>.lock``, so that runs ending at the same moment on this host (under
--no-lock) never lose each other's counts. A run that found the job
already running (exit 75) touches only ``jobrunner_last_skipped_timestamp_seconds``:
the last success keeps its time, so an alert on a stale success still fires.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from jobrunner.result import RunResult, Status

HELP = {
    "jobrunner_last_run_timestamp_seconds": ("gauge", "When the last run of the job ended."),
    "jobrunner_last_success_timestamp_seconds": ("gauge", "When the last fully successful run ended."),
    "jobrunner_last_skipped_timestamp_seconds": (
        "gauge",
        "When a run last found the job already running (exit 75).",
    ),
    "jobrunner_run_duration_seconds": ("gauge", "How long the last run took."),
    "jobrunner_last_exit_code": ("gauge", "The exit code of the last run."),
    "jobrunner_items_total": ("counter", "Items by outcome, over all runs."),
}
OUTCOMES = ("succeeded", "failed", "retried", "skipped", "replayed", "rolled_back")
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<labels>\{[^}]*\})?\s+(?P<value>\S+)\s*$")


def _labels(**labels: str) -> str:
    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


def read(path: Path) -> dict[tuple[str, str], float]:
    """The samples already in the file, by (name, labels)."""
    samples: dict[tuple[str, str], float] = {}
    try:
        text = path.read_text()
    except OSError:
        return samples
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            try:
                samples[(match["name"], match["labels"] or "")] = float(match["value"])
            except ValueError:
                continue
    return samples


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Serialise read-add-write between processes on this host (flock: the
    kernel drops it if the process dies, so it can never go stale)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def update(
    path: Path, result: RunResult, now: float | None = None, *, crashed: list[dict[str, int]] | None = None
) -> None:
    """``crashed``: the counts of earlier runs this one found dead and marked
    crashed. They never wrote this file; their items join the counter now."""
    with _exclusive(path):
        _update(path, result, time.time() if now is None else now, crashed or [])


def _update(path: Path, result: RunResult, now: float, crashed: list[dict[str, int]]) -> None:
    samples = read(path)
    for counts in crashed:
        for outcome in OUTCOMES:
            key = ("jobrunner_items_total", _labels(job=result.job, outcome=outcome))
            samples[key] = samples.get(key, 0.0) + counts.get(outcome, 0)
    job = _labels(job=result.job)
    if result.status is Status.LOCKED:
        samples[("jobrunner_last_skipped_timestamp_seconds", job)] = now
    else:
        samples[("jobrunner_last_run_timestamp_seconds", job)] = now
        samples[("jobrunner_run_duration_seconds", job)] = result.duration_seconds
        samples[("jobrunner_last_exit_code", job)] = result.exit_code
        if result.status is Status.SUCCEEDED:
            samples[("jobrunner_last_success_timestamp_seconds", job)] = now
        for outcome in OUTCOMES:
            key = ("jobrunner_items_total", _labels(job=result.job, outcome=outcome))
            samples[key] = samples.get(key, 0.0) + getattr(result, outcome)
    write(path, samples)


def failed_start(path: Path, job: str, exit_code: int, now: float | None = None) -> None:
    """A start that ended before its run (the database refused, exit 69; a bad
    config, 2): no items, but an alert on exit codes must see it."""
    with _exclusive(path):
        samples = read(path)
        labels = _labels(job=job)
        samples[("jobrunner_last_run_timestamp_seconds", labels)] = time.time() if now is None else now
        samples[("jobrunner_last_exit_code", labels)] = exit_code
        write(path, samples)


def render(samples: dict[tuple[str, str], float]) -> str:
    lines = []
    for name, (kind, text) in HELP.items():
        rows = sorted((labels, value) for (n, labels), value in samples.items() if n == name)
        if not rows:
            continue
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{labels} {value:.17g}" for labels, value in rows]
    return "\n".join(lines) + "\n"


def write(path: Path, samples: dict[tuple[str, str], float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(render(samples))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
