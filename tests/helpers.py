"""Helpers shared by the tests: read and write a real database, wait on real processes."""

from __future__ import annotations

import time

from sqlalchemy import create_engine, text


def query(url: str, sql: str) -> list[tuple]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(sql))]
    finally:
        engine.dispose()


def execute(url: str, sql: str) -> None:
    """Run one statement and commit it."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(sql))
    finally:
        engine.dispose()


def wait_for_rows(url: str, table: str, minimum: int = 1, timeout: float = 30) -> None:
    engine = create_engine(url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                with engine.connect() as conn:
                    if conn.execute(text(f"SELECT count(*) FROM {table}")).scalar() >= minimum:
                        return
            except Exception:
                pass
            time.sleep(0.05)
    finally:
        engine.dispose()
    raise AssertionError(f"no rows in {table} after {timeout}s")


def finish(proc, timeout: float = 120):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def intervals(url: str) -> dict[int, tuple[float, float]]:
    spans: dict[int, tuple[float, float]] = {}
    for pid, t0, t1 in query(url, "SELECT pid, min(t0), max(t1) FROM pairs GROUP BY pid"):
        spans[pid] = (t0, t1)
    return spans


def assert_whole_items(url: str) -> None:
    broken = query(url, "SELECT pid, item, count(*) FROM pairs GROUP BY pid, item HAVING count(*) <> 2")
    assert broken == [], f"half-committed items: {broken}"


def _lock_backends(url: str, job: str) -> str:
    """The FROM and WHERE that find ``job``'s lock connections on PostgreSQL."""
    database = url.rsplit("/", 1)[1]
    return f"FROM pg_stat_activity WHERE application_name = 'jobrunner {job} lock' AND datname = '{database}'"


def kill_lock_connection(url: str, job: str) -> list[tuple]:
    """End the backend that holds ``job``'s lock on PostgreSQL, as a network
    cut or an administrator would: [(True,)] when there was one."""
    return query(url, f"SELECT pg_terminate_backend(pid) {_lock_backends(url, job)}")


def lock_connections(url: str, job: str) -> int:
    """How many connections hold or take ``job``'s lock on PostgreSQL."""
    [(count,)] = query(url, f"SELECT count(*) {_lock_backends(url, job)}")
    return count
