"""What a batch-1 item costs, across versions of jobrunner: side by side, alternating.

    python bench/versions.py                  # 3d129c3, e1fb8bd and this checkout, median of 5
    python bench/versions.py --runs 1 --items 2000   # a smoke test

The same job (bench/jobs/bench_update.py: one single-row UPDATE per item) run
by each version from its own checkout (``git archive`` of the commit, put on
PYTHONPATH), on SQLite (WAL, synchronous=FULL) and on a durable PostgreSQL that
it starts itself (fsync and synchronous_commit on). Each version has a database
of its own, since their bookkeeping tables differ. Beside them, in the same
loop: the raw driver (bench/rawdriver.py, psycopg2 and a commit per item) and
the script a user would write by hand (bench/handwritten.py, 10,000 items at 8
workers). Whole-process wall time, start-up included; after every run every
row must have been updated exactly once. 3d129c3 had no --batch-size, so it has
no batch-100 cell. Prints Markdown tables for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import create_engine, text

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

from pgserver import PostgresServer, find_bindir  # noqa: E402
from run import reset_rows  # noqa: E402

OLD = ("3d129c3", "e1fb8bd")
BATCHLESS = {"3d129c3"}


def extract(commit: str, into: Path) -> Path:
    """The commit's tree in a folder of its own, so that it imports its own jobrunner."""
    target = into / commit
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True)
    target.mkdir()
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(target, filter="data")
    return target


def check_rows(url: str, count: int) -> None:
    engine = create_engine(url)
    with engine.connect() as conn:
        low, high, rows = conn.execute(text("SELECT min(n), max(n), count(*) FROM bench_rows")).one()
    engine.dispose()
    if (low, high, rows) != (1, 1, count):
        raise SystemExit(f"{url}: rows not updated exactly once: min {low}, max {high}, {rows} rows")


def wall(cmd: list[str], env: dict[str, str], cwd: str) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr[-1500:]}")
    return seconds


def measured(url: str, count: int, cmd: list[str], env: dict[str, str], cwd: Path) -> Callable[[], float]:
    """One timed run of ``cmd`` on fresh rows, every row checked after it."""

    def measure() -> float:
        reset_rows(url, count)
        seconds = wall(cmd, env, str(cwd))
        check_rows(url, count)
        return seconds

    return measure


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--items", type=int, default=20000, help="items of the batch-1 and batch-100 runs")
    parser.add_argument("--handwritten-items", type=int, default=10000)
    parser.add_argument("--versions", default=",".join(OLD), help="commits measured beside this checkout")
    options = parser.parse_args()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("JOBRUNNER_")}
    work = Path(tempfile.mkdtemp(prefix="jobrunner-versions-"))
    checkouts = {commit: extract(commit, work) for commit in options.versions.split(",") if commit}
    checkouts["this"] = REPO
    server = PostgresServer(find_bindir(), durable=True)
    server.start()
    try:
        admin = create_engine(server.admin_url, isolation_level="AUTOCOMMIT")
        urls: dict[tuple[str, str], str] = {}
        with admin.connect() as conn:
            for index, name in enumerate(checkouts):
                conn.execute(text(f"CREATE DATABASE v{index}"))
                urls[(name, "postgresql")] = server.admin_url.rsplit("/", 1)[0] + f"/v{index}"
                urls[(name, "sqlite")] = f"sqlite:///{work / f'v{index}.db'}"
        admin.dispose()
        n, hand_n = options.items, options.handwritten_items

        def version(name: str, database: str, workers: int, batch: int, count: int) -> Callable[[], float]:
            url = urls[(name, database)]
            env = dict(base_env, PYTHONPATH=str(checkouts[name]))
            cmd = [
                sys.executable,
                "-m",
                "jobrunner",
                "run",
                "bench_update",
                "--jobs-path",
                str(HERE / "jobs"),
            ]
            cmd += ["--database-url", url, "--workers", str(workers), "--param", f"n={count}", "--json"]
            if batch != 1:
                cmd += ["--batch-size", str(batch)]

            return measured(url, count, cmd, env, work)

        def script(path: str, workers: int, count: int) -> Callable[[], float]:
            url = urls[("this", "postgresql")]
            cmd = [
                sys.executable,
                str(HERE / path),
                "--url",
                url,
                "--workers",
                str(workers),
                "--items",
                str(count),
            ]

            return measured(url, count, cmd, base_env, work)

        cases: dict[tuple[str, str], Callable[[], float]] = {}
        for database, workers, batch in (
            ("sqlite", 4, 1),
            ("sqlite", 4, 100),
            ("postgresql", 4, 1),
            ("postgresql", 16, 1),
            ("postgresql", 4, 100),
        ):
            row = f"{database}, {workers} workers, batch {batch}"
            for name in checkouts:
                if batch == 1 or name not in BATCHLESS:
                    cases[(row, name)] = version(name, database, workers, batch, n)
            if database == "postgresql" and batch == 1:
                cases[(row, "psycopg2")] = script("rawdriver.py", workers, n)
        hand_row = f"postgresql, 8 workers, batch 1, {hand_n:,} items"
        cases[(hand_row, "this")] = version("this", "postgresql", 8, 1, hand_n)
        cases[(hand_row, "hand-written")] = script("handwritten.py", 8, hand_n)

        times: dict[tuple[str, str], list[float]] = {key: [] for key in cases}
        for round_ in range(options.runs):
            for key, measure in cases.items():
                times[key].append(measure())
                print(
                    f"round {round_ + 1}: {key[0]}: {key[1]} {times[key][-1]:.2f} s",
                    file=sys.stderr,
                    flush=True,
                )
        report(times, checkouts, n, options.runs)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def report(times: dict[tuple[str, str], list[float]], checkouts: dict[str, Path], n: int, runs: int) -> None:
    med = {key: statistics.median(values) for key, values in times.items()}
    rows = list(dict.fromkeys(row for row, _ in times))
    names = list(checkouts)
    print(f"Median of {runs} runs, seconds for {n:,} items (whole process), alternating in one loop.\n")
    print(
        "| case | "
        + " | ".join(names)
        + " | psycopg2 | "
        + "".join(f"this / {name} | " for name in names[:-1])
        + "this / psycopg2 |"
    )
    print("|---|" + "---|" * (2 * len(names) + 1))
    for row in rows:
        if "items" in row:
            continue
        cells = [f"{med[(row, name)]:.2f}" if (row, name) in med else "n/a" for name in names]
        raw = med.get((row, "psycopg2"))
        this = med[(row, "this")]
        ratios = [
            f"{this / med[(row, other)]:.2f}x" if (row, other) in med else "n/a" for other in names[:-1]
        ]
        ratios.append(f"{this / raw:.2f}x" if raw else "n/a")
        print(
            f"| {row} | "
            + " | ".join(cells)
            + f" | {f'{raw:.2f}' if raw else 'n/a'} | "
            + " | ".join(ratios)
            + " |"
        )
    for row in rows:
        if "items" in row:
            this, hand = med[(row, "this")], med[(row, "hand-written")]
            print(f"\n{row}: jobrunner {this:.2f} s, hand-written {hand:.2f} s, ratio {this / hand:.2f}x")
    print("\nraw: " + json.dumps({f"{row} | {name}": values for (row, name), values in times.items()}))


if __name__ == "__main__":
    main()
