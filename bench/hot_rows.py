"""Hot rows: a job whose item is one TPC-B transaction (bench/jobs/bench_tpcb.py),
run while ``pgbench -c 8`` runs its own TPC-B-like transactions on the same
tables (pgbench -i at scale 10: 10 branches, 100 tellers; every item and
every pgbench transaction updates one branch row). On a durable PostgreSQL
(fsync and synchronous_commit on) that the script starts.

    python bench/hot_rows.py                       # 5,000 items, 3 rounds
    python bench/hot_rows.py --items 20000 --runs 1
    python bench/hot_rows.py --against ../old       # -b 100 of another checkout too

Contenders, alternating in each round: the job at batch 1 and at ``-b 100``
(chunks adapt: they shrink under conflict and grow back), at jobrunner's
default isolation (repeatable read) and at read committed (pgbench's).
(``-b 100 --fixed-batch-size``, chunks that never shrink, is left out to
keep the run short: it is what issue 22 measured before chunks adapted.)
For each: the job's
items/s and its counts (``--json``), and pgbench's tps beside it (from its
``-P 1`` progress lines while the job ran). After every run each item's
history row is counted: each item applied exactly once, or the script stops.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from sqlalchemy import create_engine, make_url, text

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from pgserver import PostgresServer, find_bindir  # noqa: E402

CONTENDERS = {
    "repeatable read (the default), batch 1": ["-w", "8"],
    "repeatable read, -b 100": ["-w", "8", "-b", "100"],
    "read committed, batch 1": ["-w", "8", "--isolation", "read_committed"],
    "read committed, -b 100": ["-w", "8", "-b", "100", "--isolation", "read_committed"],
}


def pgbench_args(url: str) -> list[str]:
    parsed = make_url(url)
    return ["-h", str(parsed.host), "-p", str(parsed.port), "-U", str(parsed.username), str(parsed.database)]


class Pgbench:
    """``pgbench -c 8`` for as long as the ``with`` block; ``tps`` is the mean
    of its progress reports inside it."""

    def __init__(self, url: str, clients: int) -> None:
        binary = str(find_bindir() / "pgbench")
        command = [binary, "-n", "-c", str(clients), "-j", "2", "-T", "3600", "-P", "1", *pgbench_args(url)]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.rates: list[float] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            found = re.match(r"progress: [\d.]+ s, ([\d.]+) tps", line)
            if found:
                self.rates.append(float(found.group(1)))

    def __enter__(self) -> Pgbench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)

    @property
    def tps(self) -> float:
        steady = self.rates[1:-1] or self.rates  # the first and last seconds are partial
        return statistics.mean(steady) if steady else 0.0


def run_job(url: str, items: int, args: list[str], checkout: Path = HERE.parent) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBRUNNER_")}
    env["PYTHONPATH"] = str(checkout)
    command = [sys.executable, "-m", "jobrunner", "run", "bench_tpcb", "--jobs-path", str(HERE / "jobs")]
    command += ["--database-url", url, "--json", "--param", f"n={items}", *args]
    with tempfile.TemporaryDirectory() as cwd:
        out = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env)
    if out.returncode not in (0, 1):
        raise SystemExit(f"{args}: exit {out.returncode}: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def applied_once(url: str, items: int, failed: int) -> None:
    engine = create_engine(url)
    with engine.connect() as conn:
        rows, distinct = conn.execute(
            text("SELECT count(*), count(DISTINCT filler) FROM pgbench_history WHERE filler LIKE 'jr %'")
        ).one()
        conn.execute(text("DELETE FROM pgbench_history WHERE filler LIKE 'jr %'"))
        conn.commit()
    engine.dispose()
    if rows != distinct or rows != items - failed:
        raise SystemExit(f"{rows} history rows, {distinct} distinct, for {items - failed} committed items")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--only", default="", help="only the contenders whose name contains this")
    parser.add_argument("--against", type=Path, help="another checkout: its -b 100 contenders join in")
    options = parser.parse_args()
    contenders = {name: (args, HERE.parent) for name, args in CONTENDERS.items() if options.only in name}
    if options.against:
        other = options.against.resolve()
        for name, (args, _) in list(contenders.items()):
            if "-b" in args:
                contenders[f"{name} ({other.name})"] = (args, other)
    server = PostgresServer(find_bindir(), durable=True)
    server.start()
    try:
        url = server.admin_url
        subprocess.run(
            [str(find_bindir() / "pgbench"), "-i", "-q", "-s", "10", *pgbench_args(url)],
            check=True,
            capture_output=True,
        )
        results: dict[str, list[dict]] = {name: [] for name in contenders}
        for round_ in range(options.runs):
            for name, (args, checkout) in contenders.items():
                with Pgbench(url, options.clients) as pgbench:
                    summary = run_job(url, options.items, args, checkout)
                summary["pgbench_tps"] = pgbench.tps
                applied_once(url, options.items, summary["failed"])
                results[name].append(summary)
                print(
                    f"round {round_ + 1}: {name}: {summary['items_per_second']:.0f} items/s, "
                    f"pgbench {pgbench.tps:.0f} tps, replayed {summary['replayed']}, "
                    f"retried {summary['retried']}, failed {summary['failed']}, "
                    f"chunks {summary.get('chunk_sizes')}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        server.stop()
    clients, runs = options.clients, options.runs
    print(f"{options.items:,} TPC-B items at -w 8 beside pgbench -c {clients}, median of {runs}\n")
    print("| job | items/s | pgbench tps beside it | replayed | retried | failed | chunks (min/mean/max) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, rows in results.items():

        def mid(key: str, rows: list[dict] = rows) -> float:
            return statistics.median(float(row[key]) for row in rows)

        sizes = [row["chunk_sizes"] for row in rows if row.get("chunk_sizes")]
        shown = (
            "/".join(f"{statistics.median(float(s[k]) for s in sizes):g}" for k in ("min", "mean", "max"))
            if sizes
            else "1 (batch 1)"
        )
        print(
            f"| {name} | {mid('items_per_second'):,.0f} | {mid('pgbench_tps'):,.0f} | {mid('replayed'):,.0f} "
            f"| {mid('retried'):,.0f} | {mid('failed'):,.0f} | {shown} |"
        )


if __name__ == "__main__":
    main()
