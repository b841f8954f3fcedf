"""Where a batch-1 item's time goes: cProfile of the one worker thread of an
in-process run on a durable PostgreSQL (one UPDATE by primary key per item).

    python bench/item_profile.py                 # 5,000 items
    python bench/item_profile.py --items 20000 --top 20

Own time per item, split by where the code lives: psycopg2's C methods (the
round trips: execute, commit), SQLAlchemy, jobrunner, and the rest (Python's
standard library, the job). With one worker nothing queues for the GIL, so
this is the cost of one item's path; with several workers the Python part is
what they queue for. Prints a Markdown table and the top functions.
"""

from __future__ import annotations

import argparse
import concurrent.futures.thread as pool_thread
import cProfile
import pstats
import sys
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from pgserver import PostgresServer, find_bindir  # noqa: E402
from run import reset_rows  # noqa: E402
from versions import check_rows  # noqa: E402

PARTS = ("psycopg2", "sqlalchemy", "jobrunner", "other")


def part(filename: str, function: str) -> str:
    if "psycopg2" in function or "psycopg2" in filename:
        return "psycopg2"
    for name in ("sqlalchemy", "jobrunner"):
        if f"/{name}/" in filename:
            return name
    return "other"


def profiled_workers() -> list[cProfile.Profile]:
    """Every pool worker thread runs under a profiler of its own."""
    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()
    original = pool_thread._worker

    def worker(*args: Any, **kwargs: Any) -> None:
        profile = cProfile.Profile()
        with lock:
            profiles.append(profile)
        profile.runcall(original, *args, **kwargs)

    pool_thread._worker = worker  # type: ignore[assignment]
    return profiles


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--top", type=int, default=12)
    options = parser.parse_args()

    server = PostgresServer(find_bindir(), durable=True)
    server.start()
    try:
        admin = create_engine(server.admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("CREATE DATABASE profiled"))
        admin.dispose()
        url = server.admin_url.rsplit("/", 1)[0] + "/profiled"
        reset_rows(url, options.items)
        profiles = profiled_workers()
        from jobrunner.cli import cli

        args = ["run", "bench_update", "--jobs-path", str(HERE / "jobs"), "--database-url", url]
        args += ["--workers", "1", "--param", f"n={options.items}", "--quiet"]
        try:
            code = cli.main(args=args, prog_name="jobrunner")
        except SystemExit as end:
            code = end.code
        if code not in (0, None):
            raise SystemExit(f"jobrunner exited {code}")
        check_rows(url, options.items)
    finally:
        server.stop()

    stats = pstats.Stats(*profiles) if profiles else None
    if stats is None:
        raise SystemExit("no worker thread ran")
    own = dict.fromkeys(PARTS, 0.0)
    for (filename, _line, function), row in stats.stats.items():  # type: ignore[attr-defined]
        own[part(filename, function)] += row[2]
    total = sum(own.values())
    print(f"{options.items} items, one worker, durable PostgreSQL over loopback\n")
    print("| part | us per item | share |\n|---|---|---|")
    for name in PARTS:
        print(f"| {name} | {own[name] / options.items * 1e6:.0f} | {own[name] / total:.0%} |")
    print(f"| all | {total / options.items * 1e6:.0f} | 100% |\n")
    stats.sort_stats("tottime").print_stats(options.top)
    print("jobrunner's own functions:")
    stats.print_stats("/jobrunner/", options.top)


if __name__ == "__main__":
    main()
