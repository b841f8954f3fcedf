"""Does a distributed run hold back VACUUM? Its work table churns fastest of all.

    python bench/vacuum_distributed.py                         # this checkout
    python bench/vacuum_distributed.py --against ../old        # and another, one after the other

On a durable PostgreSQL (fsync and synchronous_commit on, autovacuum on) that
it starts itself: ``jobrunner run bench_update -P 2 -w 4 -b 100`` over
--items rows (1,000,000 by default), while another client updates rows of an
unrelated table in a loop. Every --every seconds the script runs ``VACUUM
(VERBOSE)`` on the work table and on the other table, and prints what each
removed, what it found "dead but not yet removable", and the work table's
size. Then a table per checkout for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from sqlalchemy import create_engine, text

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from pgserver import PostgresServer, find_bindir  # noqa: E402

TUPLES = re.compile(r"tuples: (\d+) removed, (\d+) remain, (\d+) are dead but not yet removable")


def fresh(url: str, items: int) -> None:
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        for table in ("bench_rows", "other_rows", "jobrunner_work"):
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        conn.execute(text("CREATE TABLE bench_rows (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"))
        conn.execute(text(f"INSERT INTO bench_rows SELECT g, 0 FROM generate_series(1, {items}) g"))
        conn.execute(text("CREATE TABLE other_rows (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"))
        conn.execute(text("INSERT INTO other_rows SELECT g, 0 FROM generate_series(1, 1000) g"))
        conn.execute(text("VACUUM ANALYZE"))
    engine.dispose()


def other_client(url: str, done: threading.Event) -> None:
    """Another application: one row of other_rows updated per transaction."""
    engine = create_engine(url)
    row = 0
    while not done.is_set():
        with engine.begin() as conn:
            conn.execute(text("UPDATE other_rows SET n = n + 1 WHERE id = :id"), {"id": row % 1000 + 1})
        row += 1
    engine.dispose()


def vacuum(url: str, table: str) -> tuple[int, int]:
    """(removed, dead but not yet removable) of one VACUUM (VERBOSE) of ``table``."""
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    raw = engine.raw_connection()  # psycopg2 itself: its notices hold VACUUM's report
    try:
        raw.dbapi_connection.autocommit = True  # type: ignore[union-attr]
        cursor = raw.cursor()
        del raw.dbapi_connection.notices[:]  # type: ignore[union-attr]
        cursor.execute(f"VACUUM (VERBOSE) {table}")
        report = "".join(raw.dbapi_connection.notices)  # type: ignore[union-attr]
    finally:
        raw.close()
        engine.dispose()
    found = TUPLES.search(report)
    if found is None:
        return 0, 0
    return int(found.group(1)), int(found.group(3))


def size_mb(url: str) -> float:
    engine = create_engine(url)
    with engine.connect() as conn:
        size = conn.scalar(text("SELECT coalesce(pg_total_relation_size(to_regclass('jobrunner_work')), 0)"))
    engine.dispose()
    return int(size or 0) / 2**20


def measure(checkout: Path, url: str, items: int, every: float) -> tuple[list[dict], dict]:
    fresh(url, items)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBRUNNER_")}
    env["PYTHONPATH"] = str(checkout)
    done = threading.Event()
    other = threading.Thread(target=other_client, args=(url, done), daemon=True)
    other.start()
    samples = []
    with tempfile.TemporaryDirectory() as cwd:
        started = time.monotonic()
        run = subprocess.Popen(
            [
                sys.executable, "-m", "jobrunner", "run", "bench_update", "--jobs-path", str(HERE / "jobs"),
                "--database-url", url, "--json", "-q", "-P", "2", "-w", "4", "-b", "100",
                "--param", f"n={items}",
            ],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env,
        )  # fmt: skip
        while True:
            try:
                run.wait(timeout=every)
                break
            except subprocess.TimeoutExpired:
                pass
            work_removed, work_kept = vacuum(url, "jobrunner_work")
            other_removed, other_kept = vacuum(url, "other_rows")
            sample = {
                "at_s": time.monotonic() - started,
                "work_removed": work_removed,
                "work_not_removable": work_kept,
                "other_removed": other_removed,
                "other_not_removable": other_kept,
                "work_mb": size_mb(url),
            }
            samples.append(sample)
            print(f"  {checkout.name}: {sample}", file=sys.stderr, flush=True)
        out, err = run.communicate()
    done.set()
    other.join()
    assert run.returncode == 0, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["succeeded"] == items, summary
    return samples, summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--every", type=float, default=20.0, help="seconds between VACUUMs")
    parser.add_argument("--against", type=Path, help="another checkout of jobrunner, run after this one")
    options = parser.parse_args()
    checkouts = {"this": HERE.parent}
    if options.against:
        checkouts["against"] = options.against.resolve()
    server = PostgresServer(find_bindir(), durable=True)
    server.start()
    try:
        results = {
            name: measure(path, server.admin_url, options.items, options.every)
            for name, path in checkouts.items()
        }
    finally:
        server.stop()
    for name, (samples, summary) in results.items():
        print(
            f"\n{name}: {options.items:,} items at -P 2 -w 4 -b 100, "
            f"{summary['items_seconds']:.0f} s of items, VACUUM every {options.every:g} s\n"
        )
        print(
            "| at | work table: removed | not yet removable | size MB "
            "| other table: removed | not yet removable |"
        )
        print("|---:|---:|---:|---:|---:|---:|")
        for s in samples:
            print(
                f"| {s['at_s']:.0f} s | {s['work_removed']:,} | {s['work_not_removable']:,} "
                f"| {s['work_mb']:.0f} | {s['other_removed']:,} | {s['other_not_removable']:,} |"
            )


if __name__ == "__main__":
    main()
