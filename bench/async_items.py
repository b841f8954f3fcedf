"""Async jobs against threaded ones: side by side, alternating, median of --runs.

    python bench/async_items.py --runs 3
    python bench/async_items.py --runs 3 --items 5000 --sqlite   # aiosqlite against sqlite3
    python bench/async_items.py --case process_batch --items 200000   # some cases: name holds the text

On a durable PostgreSQL (fsync and synchronous_commit on) that it starts
itself (tests/pgserver.py):

- I/O-bound: items whose prepare() waits 100 ms (asyncio.sleep in the async
  job, time.sleep in the threaded one), then one UPDATE; the async job at
  --concurrency 1000 --workers 8 (at batch 1, 50 and 100) against the
  threaded job at 8, 32 and 128 workers (--threaded-workers). Items/s,
  the most connections the run held at once (sampled from pg_stat_activity
  every 50 ms) and the run's peak RSS.
- Database-bound: one UPDATE per item at batch 1, and process_batch at batch
  1000, async (asyncpg) against threaded (psycopg2) at 4 and 16 workers, and
  raw asyncpg (executemany per 1000 in a transaction, on 1 and on 4
  connections), and plain SQLAlchemy (an AsyncSession per task, 4 tasks,
  the job's executemany per 1000).

Prints Markdown tables for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from sqlalchemy import create_engine, text

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from bad_items import fresh_rows  # noqa: E402
from pgserver import PostgresServer, find_bindir  # noqa: E402
from run import vacuum  # noqa: E402


class Connections:
    """The most backends named 'jobrunner <job>...' at once, while a run goes on."""

    def __init__(self, url: str, job: str) -> None:
        self.url, self.job, self.peak = url, job, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch)

    def __enter__(self) -> Connections:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        engine = create_engine(self.url)
        sql = text("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE :name")
        with engine.connect() as conn:
            while not self._done.wait(0.05):
                count = conn.execute(sql, {"name": f"jobrunner {self.job}%"}).scalar()
                conn.rollback()
                self.peak = max(self.peak, count or 0)
        engine.dispose()


def run(url: str, job: str, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBRUNNER_")}
    env["PYTHONPATH"] = str(HERE.parent)
    command = [sys.executable, "-m", "jobrunner", "run", job, "--jobs-path", str(HERE / "jobs")]
    command += ["--database-url", url, "--json", "--no-lock", *args]
    with tempfile.TemporaryDirectory() as cwd, Connections(url, job) as connections:
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env
        )
        stdout, stderr = _communicate(proc)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
        code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{job} {args}: exit {code}: {stderr[-2000:]}")
    summary = json.loads(stdout)
    summary["rss_mb"] = usage.ru_maxrss / 1024
    summary["connections"] = connections.peak
    return summary


def _communicate(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """Read both pipes to the end without reaping the process (wait4 does)."""
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read() if proc.stdout else ""))
    reader.start()
    err = proc.stderr.read() if proc.stderr else ""
    reader.join()
    return out[0], err


def raw_asyncpg(url: str, n: int, batch: int, connections: int = 1) -> float:
    """executemany per ``batch`` items, a transaction each, on ``connections``
    connections at once (each takes every connections-th chunk)."""
    import asyncpg

    dsn = url.replace("postgresql+psycopg2://", "postgresql://")
    starts = list(range(1, n + 1, batch))

    async def one(conn: asyncpg.Connection, mine: list[int]) -> None:
        for start in mine:
            async with conn.transaction():
                rows = [(i,) for i in range(start, min(n, start + batch - 1) + 1)]
                await conn.executemany("UPDATE bench_rows SET n = n + 1 WHERE id = $1", rows)

    async def go() -> float:
        conns = [await asyncpg.connect(dsn) for _ in range(connections)]
        t0 = time.monotonic()
        await asyncio.gather(*(one(conn, starts[k::connections]) for k, conn in enumerate(conns)))
        took = time.monotonic() - t0
        for conn in conns:
            await conn.close()
        return n / took

    return asyncio.run(go())


def plain_sqlalchemy(url: str, n: int, batch: int, sessions: int) -> float:
    """What a job author would write without jobrunner: an AsyncSession per
    task, ``sessions`` tasks, the same executemany per ``batch`` items and a
    commit each."""
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    starts = list(range(1, n + 1, batch))
    update = text("UPDATE bench_rows SET n = n + 1 WHERE id = :id")

    async def go() -> float:
        engine = create_async_engine(url.replace("postgresql+psycopg2://", "postgresql+asyncpg://"))
        maker = async_sessionmaker(engine)

        async def one(mine: list[int]) -> None:
            async with maker() as session:
                for start in mine:
                    await session.execute(
                        update, [{"id": i} for i in range(start, min(n, start + batch - 1) + 1)]
                    )
                    await session.commit()

        t0 = time.monotonic()
        await asyncio.gather(*(one(starts[k::sessions]) for k in range(sessions)))
        took = time.monotonic() - t0
        await engine.dispose()
        return n / took

    return asyncio.run(go())


def median(values: list[float]) -> float:
    return statistics.median(values)


def sqlite_section(runs: int, n: int) -> None:
    """What aiosqlite costs against sqlite3: per-item UPDATEs on a file, and
    I/O-bound items (prepare waits 100 ms) where the async job's bounds pay."""
    cases = {
        "async (aiosqlite), per item, -w 4": ("bench_db_async", ["-w", "4"]),
        "threads (sqlite3), per item, -w 4": ("bench_db", ["-w", "4"]),
        "async (aiosqlite), prepare waits 100 ms, -c 1000 -w 4": (
            "bench_io_async",
            ["-w", "4", "-c", "1000"],
        ),
        "threads (sqlite3), prepare waits 100 ms, -w 32": ("bench_io", ["-w", "32"]),
    }
    rates: dict[str, list[float]] = {name: [] for name in cases}
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{folder}/bench.db"
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE bench_rows (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"))
            conn.execute(
                text(
                    "WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < :n) "
                    "INSERT INTO bench_rows SELECT i, 0 FROM g"
                ),
                {"n": n},
            )
        engine.dispose()
        for _ in range(runs):
            for name, (job, args) in cases.items():
                env = {k: v for k, v in os.environ.items() if not k.startswith("JOBRUNNER_")}
                env["PYTHONPATH"] = str(HERE.parent)
                command = [sys.executable, "-m", "jobrunner", "run", job, "--jobs-path", str(HERE / "jobs")]
                command += ["--database-url", url, "--json", "--param", f"n={n}", *args]
                out = subprocess.run(command, capture_output=True, text=True, cwd=folder, env=env)
                if out.returncode != 0:
                    raise SystemExit(f"{job}: exit {out.returncode}: {out.stderr[-2000:]}")
                rates[name].append(json.loads(out.stdout)["items_per_second"])
    print(f"SQLite (a file, WAL): {n:,} items; median of {runs}")
    print()
    print("| run | items/s |")
    print("|---|---:|")
    for name in cases:
        print(f"| {name} | {median(rates[name]):,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--sqlite", action="store_true", help="only the SQLite section")
    parser.add_argument("--io-only", action="store_true", help="only the I/O-bound section")
    parser.add_argument("--threaded-workers", default="8,32,128", help="the threaded job's worker counts")
    parser.add_argument(
        "--case",
        action="append",
        help="only the cases whose name holds this text (repeatable); "
        "raw asyncpg runs with any database-bound case",
    )
    options = parser.parse_args()
    n = options.items
    if options.sqlite:
        sqlite_section(options.runs, n)
        return
    server = PostgresServer(find_bindir(), durable=True)
    server.start()
    try:
        url = server.admin_url
        fresh_rows(url, n)
        io_cases = {
            "async, --concurrency 1000 --workers 8": ("bench_io_async", ["-c", "1000", "-w", "8"]),
            **{
                f"async, --concurrency 1000 --workers 8 --batch-size {b}": (
                    "bench_io_async",
                    ["-c", "1000", "-w", "8", "-b", str(b)],
                )
                for b in (50, 100)
            },
            **{
                f"threads, --workers {w}": ("bench_io", ["-w", str(w)])
                for w in map(int, options.threaded_workers.split(","))
            },
        }
        db_cases = (
            {}
            if options.io_only
            else {
                "async, per item, -w 4": ("bench_db_async", ["-w", "4"]),
                "threads, per item, -w 4": ("bench_db", ["-w", "4"]),
                "async, per item, -w 16": ("bench_db_async", ["-w", "16"]),
                "threads, per item, -w 16": ("bench_db", ["-w", "16"]),
                "async, process_batch -b 1000, -w 4": ("bench_db_async", ["-w", "4", "-b", "1000"]),
                # what the default --concurrency was before it grew with -w x -b: one chunk in flight
                "async, process_batch -b 1000, -w 4 -c 100": (
                    "bench_db_async",
                    ["-w", "4", "-b", "1000", "-c", "100"],
                ),
                "threads, process_batch -b 1000, -w 4": ("bench_db", ["-w", "4", "-b", "1000"]),
            }
        )
        if options.case:
            io_cases, db_cases = (
                {name: case for name, case in cases.items() if any(c in name for c in options.case)}
                for cases in (io_cases, db_cases)
            )
        results: dict[str, list[dict]] = {name: [] for name in [*io_cases, *db_cases]}
        raw: dict[int, list[float]] = {1: [], 4: []}
        plain: list[float] = []
        for _ in range(options.runs):
            for name, (job, args) in {**io_cases, **db_cases}.items():
                vacuum(url)
                results[name].append(run(url, job, "--param", f"n={n}", *args))
            if db_cases:
                for connections, rates in raw.items():
                    vacuum(url)
                    rates.append(raw_asyncpg(url, n, 1000, connections))
                vacuum(url)
                plain.append(plain_sqlalchemy(url, n, 1000, 4))
        print(f"I/O-bound: {n:,} items, prepare() waits 100 ms, then one UPDATE; median of {options.runs}")
        print()
        print("| run | items/s | connections at most | peak RSS (MB) |")
        print("|---|---:|---:|---:|")
        for name in io_cases:
            rows = results[name]
            rate = median([r["items_per_second"] for r in rows])
            rss = median([r["rss_mb"] for r in rows])
            print(f"| {name} | {rate:,.0f} | {max(r['connections'] for r in rows)} | {rss:.0f} |")
        if not db_cases:
            return
        print()
        print(f"Database-bound: {n:,} single-row UPDATEs; median of {options.runs}")
        print()
        print("| run | items/s |")
        print("|---|---:|")
        for name in db_cases:
            print(f"| {name} | {median([r['items_per_second'] for r in results[name]]):,.0f} |")
        print(f"| plain SQLAlchemy, an AsyncSession per task, 4 tasks, per 1,000 | {median(plain):,.0f} |")
        for connections, rates in raw.items():
            print(
                f"| raw asyncpg, executemany per 1,000, {connections} connection(s) | {median(rates):,.0f} |"
            )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
