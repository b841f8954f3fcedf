"""``jobrunner status``: which jobs run now, where, and under which lock.

Two sources, because a run under --no-lock holds no lock to probe: the lock
itself (probed without taking or writing anything that lasts), and the
history rows of runs that say 'running' and still show signs of life (a
recent checkpoint, and a live process when it runs on this host).
"""

from __future__ import annotations

import socket
from datetime import UTC, timedelta
from typing import Any

from jobrunner import history, jobs, locking, tables
from jobrunner.config import Config

# A live run checkpoints every CHECKPOINT_S; a few missed ones mean it is gone.
ALIVE_WITHIN_S = 6 * history.CHECKPOINT_S


def job_status(config: Config) -> list[dict[str, Any]]:
    found = jobs.discover(config.jobs_path)
    rows: list[dict[str, Any]] = []
    if not found:
        return rows
    with tables.existing_database(config, "status") as database:
        live = _live_unlocked_runs(database) if database is not None else []
        for info in found:
            section = config.job_sections.get(info.name, {})
            mode = "file" if database is not None and database.is_sqlite else section.get("lock", config.lock)
            holder = locking.probe(database, info.name, mode) if database is not None else None
            unlocked = [run for run in live if run["job"] == info.name]
            helpers = _helpers(database, info.name) if holder is not None else []
            rows.append(
                {
                    "job": info.name,
                    "lock": "none" if section.get("no_lock", config.no_lock) else mode,
                    "running": holder is not None or bool(unlocked),
                    "holder": holder,
                    "helpers": helpers,
                    "unlocked_runs": unlocked,
                }
            )
    return rows


def _helpers(database: Any, job: str) -> list[dict[str, Any]]:
    """The live helpers of the job's running (distributed) run."""
    running = [row for row in history.running(database) if row["job"] == job and row.get("lock") != "none"]
    if not running:
        return []
    return [
        {"host": h["host"], "pid": h["pid"], "since": h["started_at"].replace(tzinfo=UTC).astimezone()}
        for h in history.helpers_of(database, running[0]["id"], ALIVE_WITHIN_S)
    ]


def _live_unlocked_runs(database: Any) -> list[dict[str, Any]]:
    now = history.utcnow()
    host = socket.gethostname()
    out = []
    for row in history.running(database):
        if row.get("lock") != "none":
            continue
        seen = row.get("checkpoint_at") or row["started_at"]
        if now - seen > timedelta(seconds=ALIVE_WITHIN_S):
            continue
        if row["host"] == host and not history.pid_alive(row["pid"]):
            continue
        out.append(
            {
                "job": row["job"],
                "run_id": row["id"],
                "host": row["host"],
                "pid": row["pid"],
                "since": row["started_at"].replace(tzinfo=UTC).astimezone(),
            }
        )
    return out
