"""Work-table claims that meet: how many the server refuses, and what they cost.

    python bench/claims.py                     # this checkout only
    python bench/claims.py --against ../old    # and another checkout, alternating
    python bench/claims.py --against ../old --case 0 --runs 4   # one case, ABBAABBA

On a durable PostgreSQL that it starts itself (tests/pgserver.py): distributed
runs of bench_update over --items rows, at batch 1, 20 and 100, counting the
"could not serialize" ERROR lines that the runs' claims write to the server's
log, beside the run's own ``retried`` and its time. Prints one line per run
and a median per case (docs/distributed.md, "Claims that meet").
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

CASES = [
    ["--processes", "2", "--workers", "4", "--batch-size", "1"],
    ["--workers", "8", "--batch-size", "1", "--join"],
    ["--processes", "2", "--workers", "4", "--batch-size", "20"],
    ["--processes", "2", "--workers", "4", "--batch-size", "100"],
]


def refused(log: Path) -> int:
    return log.read_text(errors="replace").count("could not serialize")


def run(checkout: Path, url: str, items: int, args: list[str]) -> tuple[float, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBRUNNER_")}
    env["PYTHONPATH"] = str(checkout)
    command = [sys.executable, "-m", "jobrunner", "run", "bench_update", "--jobs-path", str(HERE / "jobs")]
    command += ["--database-url", url, "--param", f"n={items}", "--json", *args]
    with tempfile.TemporaryDirectory() as cwd:
        t0 = time.monotonic()
        out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)
        elapsed = time.monotonic() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args)} exited {out.returncode}: {out.stderr[-2000:]}")
    return elapsed, json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, help="another checkout of jobrunner, run alternately")
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--case", type=int, action="append", help="only this case (an index into CASES)")
    options = parser.parse_args()
    checkouts = {"this": HERE.parent}
    if options.against:
        checkouts["against"] = options.against.resolve()
    server = PostgresServer(find_bindir(), durable=True)
    server.start()
    results: dict[tuple[str, str], list[tuple[float, int, int]]] = {}
    try:
        engine = create_engine(server.admin_url)
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE bench_rows (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"))
            rows = f"SELECT g, 0 FROM generate_series(1, {options.items}) g"
            conn.execute(text(f"INSERT INTO bench_rows {rows}"))
        engine.dispose()
        log = server.root / "server.log"
        cases = [CASES[i] for i in options.case] if options.case else CASES
        for round_ in range(options.runs):
            for args in cases:
                case = " ".join(args)
                # Each round the other checkout goes first: AB, BA, AB, ...
                ordered = list(checkouts.items())[:: 1 if round_ % 2 == 0 else -1]
                for name, checkout in ordered:
                    before = refused(log)
                    elapsed, summary = run(checkout, server.admin_url, options.items, args)
                    lines = refused(log) - before
                    retried = summary["retried"]
                    results.setdefault((case, name), []).append((elapsed, lines, retried))
                    print(f"{name:7} {case:52} {elapsed:6.1f} s  ERROR lines {lines:3}  retried {retried}")
    finally:
        server.stop()
    print()
    for (args, name), runs in results.items():
        median = statistics.median(elapsed for elapsed, _, _ in runs)
        lines, retried = [r[1] for r in runs], [r[2] for r in runs]
        print(f"{name:7} {args:52} median {median:6.1f} s  ERROR lines {lines}  retried {retried}")


if __name__ == "__main__":
    main()
