"""What bad items cost a chunked run: side by side, alternating, median of --runs.

    python bench/bad_items.py                         # this checkout only
    python bench/bad_items.py --against ../old        # and another checkout of jobrunner, alternating

On a durable PostgreSQL (fsync and synchronous_commit on) that it starts
itself (tests/pgserver.py): 50,000 single-row UPDATEs at --batch-size 500,
4 workers, with no bad item and with 1% of them raising after their UPDATE;
and one chunk of 1,000 items with one bad item, counting the tries of
process(). Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import create_engine, text

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from pgserver import PostgresServer, find_bindir  # noqa: E402


def fresh_rows(url: str, count: int) -> None:
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("DROP TABLE IF EXISTS bench_rows"))
        conn.execute(text("CREATE TABLE bench_rows (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"))
        conn.execute(text(f"INSERT INTO bench_rows SELECT g, 0 FROM generate_series(1, {count}) g"))
        conn.execute(text("VACUUM ANALYZE bench_rows"))
    engine.dispose()


def run(checkout: Path, url: str, *args: str) -> tuple[float, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBRUNNER_")}
    env["PYTHONPATH"] = str(checkout)
    with tempfile.TemporaryDirectory() as cwd:
        t0 = time.monotonic()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "jobrunner",
                "run",
                "bench_trickle",
                "--jobs-path",
                str(HERE / "jobs"),
                "--database-url",
                url,
                "--json",
                *args,
            ],
            capture_output=True,
            text=True,
            cwd=cwd,
            env=env,
        )
        wall = time.monotonic() - t0
    return wall, json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--items", type=int, default=50000)
    parser.add_argument("--against", type=Path, help="another checkout of jobrunner, measured alternately")
    options = parser.parse_args()
    checkouts = {"this": HERE.parent}
    if options.against:
        checkouts["against"] = options.against.resolve()
    bindir = find_bindir()
    server = PostgresServer(bindir, durable=True)
    server.start()
    try:
        url = server.admin_url
        n = options.items
        cases = {
            "no bad item": ("-b", "500", "-w", "4", "--param", f"n={n}", "--param", "every=0"),
            "1% bad": ("-b", "500", "-w", "4", "--param", f"n={n}", "--param", "every=100"),
        }
        results: dict[tuple[str, str], list[float]] = {}
        replayed: dict[tuple[str, str], int] = {}
        for _ in range(options.runs):
            for case, args in cases.items():
                for name, checkout in checkouts.items():
                    fresh_rows(url, n)
                    wall, summary = run(checkout, url, *args)
                    results.setdefault((name, case), []).append(wall)
                    replayed[(name, case)] = summary["replayed"]
                    assert summary["failed"] == (n // 100 if case == "1% bad" else 0), summary
        print("| checkout | case | wall s (median) | replayed | ratio to no bad item |")
        print("|---|---|---|---|---|")
        for name in checkouts:
            base = statistics.median(results[(name, "no bad item")])
            for case in cases:
                wall = statistics.median(results[(name, case)])
                print(f"| {name} | {case} | {wall:.2f} | {replayed[(name, case)]} | {wall / base:.2f}x |")
        # One bad item in one chunk of 1,000: transactions and UPDATEs it took.
        fresh_rows(url, 1000)
        engine = create_engine(url, isolation_level="AUTOCOMMIT")

        def counters() -> tuple[int, int]:
            time.sleep(1.0)  # the statistics collector's delay
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_stat_clear_snapshot()"))
                commits = conn.execute(
                    text("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
                ).scalar()
                updates = conn.execute(
                    text("SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'bench_rows'")
                ).scalar()
            return commits, updates

        for name, checkout in checkouts.items():
            before = counters()
            run(checkout, url, "-b", "1000", "-w", "1", "--param", "n=1000", "--param", "every=1000")
            after = counters()
            print(
                f"{name}: one bad item in a chunk of 1,000: {after[0] - before[0]} transactions committed "
                f"(jobrunner's bookkeeping included), {after[1] - before[1]} UPDATEs executed"
            )
        engine.dispose()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
