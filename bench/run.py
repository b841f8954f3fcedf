"""Run the benchmarks and write BENCHMARKS.md (and bench/throughput.png, bench/batches.png).

    pip install -e '.[bench]' && python bench/run.py   # SQLite, and PostgreSQL and MariaDB it starts
    python bench/run.py --only batches,isolation       # some sections; the others keep their text
    python bench/run.py --quick                        # fewer runs and items: a smoke test
    python bench/run.py --report-only                  # rewrite from bench/results/latest.json

BENCHMARKS.md is the table SECTIONS, in its order: each section names what
measures it and writes its own numbered parts. A section this run did not
measure keeps its text from the file as it is, so `--only` on a fresh clone
rewrites just that section. Sections 14-19 are measured by scripts of their
own (bench/bad_items.py, async_items.py, versions.py with begin_cost.py and
item_profile.py, hot_rows.py, vacuum_distributed.py, claims.py), and written
by hand from what they print.

Each timing is the median of --runs runs (5 by default); contenders in a
comparison are measured in the same run, alternating.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import json
import os
import platform
import pstats
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

HERE = Path(__file__).parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

JOBS = str(HERE / "jobs")


def jobrunner_cmd() -> list[str]:
    script = Path(sys.executable).parent / "jobrunner"
    return [str(script)] if script.exists() else [sys.executable, "-m", "jobrunner"]


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("JOBRUNNER_")}


def timed(cmd: list[str], **kw) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env(), **kw)
    elapsed = time.perf_counter() - t0
    if out.returncode not in (0, 75):
        raise RuntimeError(f"{cmd} exited {out.returncode}: {out.stderr[-2000:]}")
    return elapsed, out


def reset_rows(url: str, count: int) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS bench_rows"))
        conn.execute(text("CREATE TABLE bench_rows (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"))
        conn.execute(
            text("INSERT INTO bench_rows (id, n) VALUES (:id, 0)"), [{"id": i} for i in range(1, count + 1)]
        )
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE bench_rows"))
    engine.dispose()


def vacuum(url: str, table: str = "bench_rows") -> None:
    if url.startswith("postgresql"):
        engine = create_engine(url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            if conn.scalar(text("SELECT to_regclass(:t)"), {"t": table}) is not None:
                conn.execute(text(f"VACUUM {table}"))
        engine.dispose()


def med(values: list[float]) -> float:
    return statistics.median(values)


# -- 1 and 2: overhead against the hand-written script and the raw driver -------------
def bench_overhead(
    name: str, url: str, runs: int, items: int, workers_list: list[int], raw: bool
) -> list[dict]:
    reset_rows(url, items)
    rows = []
    for workers in workers_list:
        times: dict[str, list[float]] = {"jobrunner": [], "hand-written": [], "psycopg2": []}
        contenders = {
            "jobrunner": [
                *jobrunner_cmd(),
                "run",
                "bench_update",
                "--jobs-path",
                JOBS,
                "--database-url",
                url,
                "--workers",
                str(workers),
                "--param",
                f"n={items}",
                "-q",
            ],
            "hand-written": [
                sys.executable,
                str(HERE / "handwritten.py"),
                "--url",
                url,
                "--workers",
                str(workers),
                "--items",
                str(items),
            ],
        }
        if raw:
            contenders["psycopg2"] = [
                sys.executable,
                str(HERE / "rawdriver.py"),
                "--url",
                url,
                "--workers",
                str(workers),
                "--items",
                str(items),
            ]
        for _ in range(runs):
            for label, cmd in contenders.items():  # alternating, side by side
                vacuum(url)
                times[label].append(timed(cmd)[0])
        row = {
            "db": name,
            "workers": workers,
            "jobrunner": med(times["jobrunner"]),
            "hand-written": med(times["hand-written"]),
        }
        row["ratio"] = row["jobrunner"] / row["hand-written"]
        if raw:
            row["psycopg2"] = med(times["psycopg2"])
            row["ratio_raw"] = row["jobrunner"] / row["psycopg2"]
        print(f"  overhead {name} w={workers}: {row}", flush=True)
        rows.append(row)
    return rows


def profile_one_worker(url: str, items: int) -> str:
    """cProfile of the worker thread of an in-process run, one worker."""
    import threading

    from jobrunner import config as configmod
    from jobrunner import runner

    reset_rows(url, items)
    profiler = cProfile.Profile()

    def hook(*_args):  # runs first in each new thread
        if threading.current_thread().name.startswith("jobrunner-bench_update"):
            profiler.enable()  # replaces this hook with cProfile's, in this thread only
        else:
            sys.setprofile(None)

    threading.setprofile(hook)
    try:
        config = configmod.load(
            {"database_url": url, "jobs_path": JOBS, "workers": 1, "params": {"n": str(items)}},
            job="bench_update",
        )
        runner.run(config)
    finally:
        threading.setprofile(None)
        profiler.disable()
    buffer = io.StringIO()
    stats = pstats.Stats(profiler, stream=buffer).sort_stats("tottime")
    stats.print_stats(12)
    return buffer.getvalue()


# -- 3: scaling with I/O-bound items ---------------------------------------------------
def bench_scaling(name: str, url: str, runs: int, per_worker: int, workers_list: list[int]) -> list[dict]:
    rows = []
    for workers in workers_list:
        count = per_worker * workers
        reset_rows(url, count)
        rates = []
        for _ in range(runs):
            _, out = timed(
                [
                    *jobrunner_cmd(),
                    "run",
                    "bench_update",
                    "--jobs-path",
                    JOBS,
                    "--database-url",
                    url,
                    "--workers",
                    str(workers),
                    "--param",
                    f"n={count}",
                    "--param",
                    "sleep=0.01",
                    "--json",
                ]
            )
            summary = json.loads(out.stdout)
            rates.append(summary["succeeded"] / summary["duration_seconds"])
        rows.append({"db": name, "workers": workers, "items_per_s": med(rates)})
        print(f"  scaling {name} w={workers}: {rows[-1]}", flush=True)
    base = rows[0]["items_per_s"]
    for row in rows:
        row["speedup"] = row["items_per_s"] / base
    return rows


# -- 4: memory -----------------------------------------------------------------------------
def bench_memory(name: str, url: str, sizes: list[int]) -> list[dict]:
    rows = []
    for n in sizes:
        probe = (
            "import resource, subprocess, sys\n"
            "r = subprocess.run(sys.argv[1:], capture_output=True)\n"
            "assert r.returncode == 0, r.stderr\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        )
        cmd = [
            sys.executable,
            "-c",
            probe,
            *jobrunner_cmd(),
            "run",
            "bench_noop",
            "--jobs-path",
            JOBS,
            "--database-url",
            url,
            "--param",
            f"n={n}",
            "-q",
        ]
        elapsed, out = timed(cmd)
        rows.append(
            {"db": name, "items": n, "peak_rss_mb": int(out.stdout.strip()) / 1024, "seconds": elapsed}
        )
        print(f"  memory {name}: {rows[-1]}", flush=True)
    return rows


# -- 5: the lock ------------------------------------------------------------------------------
def bench_lock(name: str, url: str, runs: int) -> dict:
    loser_times, takeover_times = [], []
    base = [*jobrunner_cmd(), "run", "bench_slow", "--jobs-path", JOBS, "--database-url", url]
    engine = create_engine(url)
    for _ in range(runs):
        holder = subprocess.Popen([*base, "--param", "n=100000", "-q"], env=env())
        _wait_marks(engine, holder.pid)
        loser_times.append(timed([*base, "-q"])[0])
        waiter = subprocess.Popen([*base, "--param", "n=5", "--wait-lock", "60", "-q"], env=env())
        time.sleep(1.0)  # the waiter is polling for the lock
        killed = time.time()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        first = _wait_marks(engine, waiter.pid)
        takeover_times.append(first - killed)
        waiter.wait(timeout=60)
    engine.dispose()
    row = {"db": name, "loser_exit_s": med(loser_times), "takeover_s": med(takeover_times)}
    print(f"  lock {name}: {row}", flush=True)
    return row


def _wait_marks(engine, pid: int, timeout: float = 60) -> float:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with engine.connect() as conn:
                first = conn.execute(
                    text("SELECT min(at) FROM bench_marks WHERE pid = :p"), {"p": pid}
                ).scalar()
            if first is not None:
                return first
        except Exception:  # noqa: BLE001 - table not created yet
            pass
        time.sleep(0.01)
    raise RuntimeError(f"process {pid} never processed an item")


# -- 6: start-up --------------------------------------------------------------------------------
def bench_startup(runs: int, url: str) -> list[dict]:
    rows = []
    for label, args in (
        ("jobrunner --help", ["--help"]),
        ("jobrunner list", ["list", "--jobs-path", JOBS, "--database-url", url]),
    ):
        times = [timed([*jobrunner_cmd(), *args])[0] for _ in range(runs)]
        rows.append({"command": label, "median_ms": med(times) * 1000})
    baseline = [timed([sys.executable, "-c", "pass"])[0] for _ in range(runs)]
    rows.append({"command": "python -c pass (interpreter alone)", "median_ms": med(baseline) * 1000})
    print(f"  startup: {rows}", flush=True)
    return rows


# -- VACUUM cost of the row lock vs the advisory lock ----------------------------------------------
def bench_vacuum(url: str) -> list[dict]:
    rows = []
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    for mode in ("row", "advisory"):
        reset_rows(url, 1000)
        folder = Path(tempfile.mkdtemp())
        (folder / "jobrunner.toml").write_text(f'[jobs.bench_slow]\nlock = "{mode}"\n')
        holder = subprocess.Popen(
            [
                *jobrunner_cmd(),
                "run",
                "bench_slow",
                "--jobs-path",
                JOBS,
                "--database-url",
                url,
                "--param",
                "n=100000",
                "--param",
                "touch_db=0",
                "-q",
            ],
            cwd=folder,
            env=env(),
        )
        _wait_guard(engine, "bench_slow", holder.pid)
        raw = engine.raw_connection()  # psycopg2 itself: its notices hold VACUUM's report
        try:
            raw.dbapi_connection.autocommit = True
            cursor = raw.cursor()
            cursor.execute("UPDATE bench_rows SET n = n + 1")
            cursor.execute("VACUUM (VERBOSE) bench_rows")
            notices = " ".join(raw.dbapi_connection.notices)
        finally:
            raw.close()
        holder.send_signal(signal.SIGTERM)
        holder.wait(timeout=60)
        shutil.rmtree(folder)
        removed = _grab(notices, r"tuples: (\d+) removed")
        kept = _grab(notices, r"(\d+) are dead but not yet removable")
        rows.append({"lock": mode, "dead_removed": removed, "dead_not_removable": kept})
        print(f"  vacuum {mode}: {rows[-1]}", flush=True)
    engine.dispose()
    return rows


def _wait_guard(engine, job: str, pid: int, timeout: float = 60) -> None:
    """Until process ``pid`` holds the job's lock, then a second for its start-up
    transactions (schema check, holder row) to end."""
    deadline = time.time() + timeout
    query = text("SELECT count(*) FROM jobrunner_lock_holders WHERE job = :j AND pid = :p")
    while time.time() < deadline:
        try:
            with engine.connect() as conn:
                if conn.execute(query, {"j": job, "p": pid}).scalar():
                    time.sleep(1.0)
                    return
        except Exception:  # noqa: BLE001 - the table may not exist yet
            pass
        time.sleep(0.05)
    raise RuntimeError(f"process {pid} never took the lock of {job}")


def _grab(text_: str, pattern: str) -> int | None:
    import re

    match = re.search(pattern, text_)
    return int(match.group(1)) if match else None


# -- 7: batches, against the server's and the driver's limits ------------------------------
PGBENCH_SCRIPT = "\\set id random(1, {rows})\nUPDATE bench_rows SET n = n + 1 WHERE id = :id;\n"


def _rate(cmd: list[str]) -> float:
    """Items per second of processing, from a contender's own JSON line."""
    _, out = timed(cmd)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    if "items_per_second" in data:
        return data["succeeded"] / data["items_seconds"]
    return data["items"] / data["seconds"]


def _pgbench(url: str, clients: int, rows: int, seconds: int = 5) -> float:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    script = Path(tempfile.mkstemp(suffix=".sql")[1])
    script.write_text(PGBENCH_SCRIPT.format(rows=rows))
    pgbench = Path(__import__("pgserver").find_bindir()) / "pgbench"
    out = subprocess.run(
        [
            str(pgbench),
            "-n",
            "-f",
            str(script),
            "-c",
            str(clients),
            "-j",
            str(clients),
            "-T",
            str(seconds),
            "-h",
            parsed.host,
            "-p",
            str(parsed.port),
            "-U",
            parsed.username,
            parsed.database,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    script.unlink()
    import re

    return float(re.search(r"tps = ([\d.]+) \(without initial", out.stdout).group(1))


def bench_batches(profile: str, url: str, runs: int, items: int, workers_list: list[int]) -> list[dict]:
    reset_rows(url, items)
    rows = []
    for workers in workers_list:
        w = str(workers)
        jr = [
            *jobrunner_cmd(),
            "run",
            "--jobs-path",
            JOBS,
            "--database-url",
            url,
            "-w",
            w,
            "--json",
            "-q",
            "--param",
            f"n={items}",
        ]
        contenders = {
            "hand-written": [
                sys.executable,
                str(HERE / "handwritten.py"),
                "--url",
                url,
                "--workers",
                w,
                "--items",
                str(items),
            ],
            "batch 1": [*jr, "bench_update", "-b", "1"],
            "batch 10": [*jr, "bench_update", "-b", "10"],
            "batch 100": [*jr, "bench_update", "-b", "100"],
            "batch 1000": [*jr, "bench_update", "-b", "1000"],
            "process_batch 100": [*jr, "bench_update_set", "-b", "100"],
            "process_batch 1000": [*jr, "bench_update_set", "-b", "1000"],
            "psycopg2 per item": [
                sys.executable,
                str(HERE / "rawdriver.py"),
                "--url",
                url,
                "--workers",
                w,
                "--items",
                str(items),
            ],
            "psycopg2 per 100": [
                sys.executable,
                str(HERE / "rawdriver.py"),
                "--url",
                url,
                "--workers",
                w,
                "--items",
                str(items),
                "--per",
                "100",
            ],
        }
        rates: dict[str, list[float]] = {label: [] for label in [*contenders, "pgbench"]}
        for _ in range(runs):
            for label, cmd in contenders.items():  # alternating, side by side
                vacuum(url)
                rates[label].append(_rate(cmd))
            vacuum(url)
            rates["pgbench"].append(_pgbench(url, workers, items))
        row = {"profile": profile, "workers": workers, **{label: med(v) for label, v in rates.items()}}
        print(f"  batches {profile} w={workers}: {row}", flush=True)
        rows.append(row)
    return rows


# -- 8: the cost of the safe isolation default ----------------------------------------------
def bench_isolation(url: str, runs: int, items: int, workers: int = 4) -> list[dict]:
    reset_rows(url, items)
    base = [
        *jobrunner_cmd(),
        "run",
        "bench_update",
        "--jobs-path",
        JOBS,
        "--database-url",
        url,
        "-w",
        str(workers),
        "--json",
        "-q",
        "--param",
        f"n={items}",
    ]
    levels = ("read_committed", "repeatable_read", "serializable")
    rates: dict[str, list[float]] = {level: [] for level in levels}
    for _ in range(runs):
        for level in levels:
            vacuum(url)
            rates[level].append(_rate([*base, "--isolation", level]))
    rows = [{"isolation": level, "items_per_s": med(v)} for level, v in rates.items()]
    for row in rows:
        row["vs_rc"] = row["items_per_s"] / rows[0]["items_per_s"]
    print(f"  isolation: {rows}", flush=True)
    return rows


# -- 9: a dry run against a real run --------------------------------------------------------
def bench_dry_run(name: str, url_for: callable, runs: int) -> dict:
    """The example job (2,000 products): a real run at 4 workers on a fresh
    database, against a dry run of the same on a fresh database."""
    jobs = str(REPO / "jobs")
    real, dry = [], []
    for i in range(runs):
        for label, extra, sink in (("real", [], real), ("dry", ["--dry-run"], dry)):
            url = url_for(f"{label}{i}")
            elapsed, _ = timed(
                [
                    *jobrunner_cmd(),
                    "run",
                    "update",
                    "--jobs-path",
                    jobs,
                    "--database-url",
                    url,
                    "-w",
                    "4",
                    "-q",
                    *extra,
                ]
            )
            sink.append(elapsed)
    row = {"db": name, "real_s": med(real), "dry_s": med(dry)}
    row["ratio"] = row["dry_s"] / row["real_s"]
    print(f"  dry run {name}: {row}", flush=True)
    return row


# -- 10: SQLite and slow items ------------------------------------------------------------------
def bench_sqlite_slow(url: str, items: int = 50) -> list[dict]:
    rows = []
    for where in ("process", "prepare"):
        for workers in (1, 8, 32):
            elapsed, _ = timed(
                [
                    *jobrunner_cmd(),
                    "run",
                    "bench_slow_write",
                    "--jobs-path",
                    JOBS,
                    "--database-url",
                    url,
                    "-w",
                    str(workers),
                    "-q",
                    "--no-lock",
                    "--param",
                    f"n={items}",
                    "--param",
                    f"where={where}",
                ]
            )
            rows.append({"where": where, "workers": workers, "items": items, "seconds": elapsed})
            print(f"  sqlite slow: {rows[-1]}", flush=True)
    return rows


# -- 11: a restart mid-run ------------------------------------------------------------------
def bench_restart(server, url: str, items: int = 20000) -> list[dict]:
    """A fast restart two seconds into a run, with and without the lock: items
    failed (target 0) and how long the run waited for the database."""
    import re

    rows = []
    for lock in ([], ["--no-lock"]):
        reset_rows(url, items)
        proc = subprocess.Popen(
            [
                *jobrunner_cmd(),
                "run",
                "bench_update",
                "--jobs-path",
                JOBS,
                "--database-url",
                url,
                "-w",
                "4",
                "--param",
                f"n={items}",
                "--param",
                "sleep=0.0005",
                "--json",
                *lock,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(),
        )
        time.sleep(2.5)
        t0 = time.monotonic()
        server.pg_ctl("-m", "fast", "-w", "restart")
        restart_s = time.monotonic() - t0
        out, err = proc.communicate(timeout=300)
        summary = json.loads(out)
        waited = [float(x) for x in re.findall(r"the database is back after ([\d.]+)s", err)]
        rows.append(
            {
                "lock": "no lock" if lock else "row lock",
                "exit": proc.returncode,
                "succeeded": summary["succeeded"],
                "failed": summary["failed"],
                "restart_s": restart_s,
                "waited_s": max(waited) if waited else 0.0,
                "retaken": "lock taken again" in err,
                "errors": "; ".join(sorted({f["error"][:120] for f in summary.get("failures", [])})),
            }
        )
        print(f"  restart: {rows[-1]}", flush=True)
    return rows


# -- 12: VACUUM and how items() reads ------------------------------------------------------------
def bench_vacuum_items(url: str) -> list[dict]:
    rows = []
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    for source in ("paged", "stream"):
        reset_rows(url, 1000)
        folder = Path(tempfile.mkdtemp())
        (folder / "jobrunner.toml").write_text('[jobs.bench_paged]\nlock = "advisory"\n')
        holder = subprocess.Popen(
            [
                *jobrunner_cmd(),
                "run",
                "bench_paged",
                "--jobs-path",
                JOBS,
                "--database-url",
                url,
                "-w",
                "2",
                "--param",
                f"source={source}",
                "-q",
            ],
            cwd=folder,
            env=env(),
        )
        _wait_guard(engine, "bench_paged", holder.pid)
        time.sleep(2.0)
        raw = engine.raw_connection()
        try:
            raw.dbapi_connection.autocommit = True
            cursor = raw.cursor()
            cursor.execute("UPDATE bench_rows SET n = n + 1")
            time.sleep(1.0)  # item transactions older than the UPDATE end
            cursor.execute("VACUUM (VERBOSE) bench_rows")
            notices = " ".join(raw.dbapi_connection.notices)
        finally:
            raw.close()
        holder.send_signal(signal.SIGTERM)
        holder.wait(timeout=60)
        shutil.rmtree(folder)
        rows.append(
            {
                "items": "jobrunner.paged()" if source == "paged" else "yield_per (one cursor)",
                "dead_removed": _grab(notices, r"tuples: (\d+) removed"),
                "dead_not_removable": _grab(notices, r"(\d+) are dead but not yet removable"),
            }
        )
        print(f"  vacuum items: {rows[-1]}", flush=True)
    engine.dispose()
    return rows


# -- 13: one run over several processes ----------------------------------------------------
def bench_processes(url: str, runs: int, quick: bool) -> dict:
    """CPU-bound and I/O-bound items, one process against two with the same
    number of threads in all; the work table's cost per item; the leader's memory."""
    jr = [*jobrunner_cmd(), "run", "--jobs-path", JOBS, "--database-url", url, "--json", "-q"]
    # Short runs (seconds) show the spawned helper's start-up; long ones the
    # steady state a batch job of any size lives in.
    sizes = {"cpu": (400, 1200), "io": (400, 1200)} if quick else {"cpu": (4000, 12000), "io": (3000, 12000)}
    reset_rows(url, max(n for pair in sizes.values() for n in pair))
    param = {"cpu": "ms=2", "io": "sleep=0.01"}
    layouts = {
        "1 process x 8 threads": ["-w", "8"],
        "2 processes x 4 threads": ["-w", "4", "--processes", "2"],
    }
    cases = [(shape, n, layout) for shape, pair in sizes.items() for n in pair for layout in layouts]
    seen: dict[tuple[str, int, str], list[tuple[float, float]]] = {case: [] for case in cases}
    for _ in range(runs):
        for shape, n, layout in cases:
            vacuum(url)
            args = ["bench_cpu", "--param", f"n={n}", "--param", param[shape], "-b", "50", *layouts[layout]]
            _, out = timed([*jr, *args])
            data = json.loads(out.stdout.strip().splitlines()[-1])
            secs = data["items_seconds"]
            seen[(shape, n, layout)].append((data["succeeded"] / secs, secs))
    scale = [
        {
            "items": shape,
            "n": n,
            "layout": layout,
            "items_per_s": med([rate for rate, _ in values]),
            "seconds": med([secs for _, secs in values]),
        }
        for (shape, n, layout), values in seen.items()
    ]
    for row in scale:
        same = [r for r in scale if (r["items"], r["n"]) == (row["items"], row["n"])]
        one = next(r for r in same if r["layout"].startswith("1 "))
        row["x_one"] = row["items_per_s"] / one["items_per_s"]
    print(f"  processes: {scale}", flush=True)

    # The work table's own cost: no-op items, one process with the in-memory
    # feed against one process feeding and claiming through the work table.
    n = 5000 if quick else 20000
    cost = []
    for batch in (1, 10, 100):
        times: dict[str, list[float]] = {"memory": [], "work table": []}
        for _ in range(runs):
            for label, extra in (("memory", []), ("work table", ["--join"])):
                # The runs before leave dead rows in the work table (a run's
                # lock holds back the xmin horizon); autovacuum would get to
                # them in its own time, and this measures the claims, not that.
                vacuum(url, "jobrunner_work")
                _, out = timed([*jr, "bench_noop", "--param", f"n={n}", "-w", "4", "-b", str(batch), *extra])
                data = json.loads(out.stdout)
                times[label].append(data["items_seconds"] / n * 1e6)
        row = {"batch": batch, "memory_us": med(times["memory"]), "table_us": med(times["work table"])}
        row["cost_us"] = row["table_us"] - row["memory_us"]
        cost.append(row)
        print(f"  work table cost: {row}", flush=True)

    memory = []
    for items in [10_000, 100_000] if quick else [100_000, 1_000_000]:
        probe = (
            "import resource, subprocess, sys\n"
            "r = subprocess.run(sys.argv[1:], capture_output=True)\n"
            "assert r.returncode == 0, r.stderr\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        )
        cmd = [
            sys.executable,
            "-c",
            probe,
            *jr,
            "bench_noop",
            "--param",
            f"n={items}",
            "--join",
            "-b",
            "100",
            "-w",
            "4",
        ]
        vacuum(url, "jobrunner_work")
        elapsed, out = timed(cmd)
        memory.append({"items": items, "peak_rss_mb": int(out.stdout.strip()) / 1024, "seconds": elapsed})
        print(f"  leader memory: {memory[-1]}", flush=True)
    return {"scale": scale, "cost": cost, "memory": memory}


# -- the sections: what each measures, and its part of BENCHMARKS.md ------------------------------
@dataclass(frozen=True)
class Bench:
    """What every measurement is given: the sizes, and the databases the run started."""

    runs: int
    quick: bool
    items: int
    sqlite_url: str
    pg_url: str  # fsync off
    prod_url: str  # production-like: fsync and synchronous_commit on
    maria_url: str
    durable: Any  # the production-like server, for the restart section
    fresh_pg: Callable[[str], str]  # a new database on the fsync-off server
    work: Path

    @property
    def databases(self) -> list[tuple[str, str]]:
        return [("sqlite", self.sqlite_url), ("postgresql", self.pg_url), ("mariadb", self.maria_url)]

    @property
    def batch_runs(self) -> int:
        return 1 if self.quick else 3

    @property
    def batch_items(self) -> int:
        return 2000 if self.quick else 10000


@dataclass(frozen=True)
class Section:
    """One measurement and the numbered parts of BENCHMARKS.md it writes.

    ``measure`` returns what ``render`` turns into markdown (saved in
    bench/results/latest.json between the two); ``render`` is also given every
    section's results, for a section that quotes another's. A section with no
    ``measure`` is measured by ``scripts`` of its own and written by hand from
    what they print; this script keeps its text as it is.
    """

    key: str
    numbers: tuple[int, ...]
    measure: Callable[[Bench], Any] | None = None
    render: Callable[[Any, dict[str, Any]], str] | None = None
    scripts: tuple[str, ...] = ()


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("" if value is None else format(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measure_overhead(b: Bench) -> dict:
    rows = [
        r
        for name, url in b.databases
        for r in bench_overhead(name, url, b.runs, b.items, [1, 4, 16], raw=name == "postgresql")
    ]
    return {"items": b.items, "rows": rows, "profile": profile_one_worker(b.pg_url, min(b.items, 5000))}


def render_overhead(data: dict, _all: dict) -> str:
    rows = data["rows"]
    return f"""## 1. Overhead: jobrunner vs the hand-written script

{data["items"]:,} items, each `UPDATE bench_rows SET n = n + 1 WHERE id = :id` then commit. Whole-process wall
time (start-up included) of `jobrunner run` against `bench/handwritten.py` (ThreadPoolExecutor,
one sessionmaker, a session per worker thread, a commit per item). Target: ratio at most 1.05.

{
        table(
            rows,
            [
                ("db", "database", "s"),
                ("workers", "workers", "d"),
                ("jobrunner", "jobrunner s", ".2f"),
                ("hand-written", "hand-written s", ".2f"),
                ("ratio", "ratio", ".3f"),
            ],
        )
    }

## 2. The driver's limit: psycopg2 directly

The same work through psycopg2, one connection per thread, no SQLAlchemy (`bench/rawdriver.py`).

{
        table(
            [x for x in rows if "psycopg2" in x],
            [
                ("workers", "workers", "d"),
                ("jobrunner", "jobrunner s", ".2f"),
                ("psycopg2", "psycopg2 s", ".2f"),
                ("ratio_raw", "jobrunner / psycopg2", ".2f"),
            ],
        )
    }

Where the difference goes: cProfile of the one worker thread of an in-process run
(PostgreSQL, one worker), sorted by own time:

```
{data["profile"].strip()}
```

{driver_analysis(rows, data["profile"])}"""


def driver_analysis(rows: list[dict], profile: str) -> str:
    raw = [x for x in rows if "psycopg2" in x]
    if not raw:
        return ""
    share, python_us, n = profile_shares(profile)
    one = next(x for x in raw if x["workers"] == 1)
    many = [x for x in raw if x["workers"] > 1]
    span = f"{min(x['ratio_raw'] for x in many):.1f}-{max(x['ratio_raw'] for x in many):.1f}x"
    return f"""Reading the profile: {share:.0%} of the worker's time is inside psycopg2 (`execute` and
`commit`: the round trips to the server); the rest, about {python_us:.0f} us per item over {n:,}
items, is Python in SQLAlchemy's Session and Connection (autobegin, statement execution, commit
bookkeeping) and, a small part of it, jobrunner's own per-item code. With one worker the round
trips dominate, so jobrunner costs {one["ratio_raw"]:.2f}x raw psycopg2. With several workers on this
machine that Python time, which holds the GIL, is what the workers queue for, while raw
psycopg2 releases the GIL for nearly all of each item: hence {span}. The cost is SQLAlchemy's,
paid equally by the hand-written script (section 1); a job that needs the driver's limit can
use `session.connection().connection` (the DBAPI connection) inside `process`."""


def profile_shares(profile: str) -> tuple[float, float, int]:
    """From the profile text: the share of the worker's time inside psycopg2,
    the Python time per item outside it (microseconds), and the item count."""
    total = float(re.search(r"in ([\d.]+) seconds", profile).group(1))
    driver = sum(float(m.group(1)) for m in re.finditer(r"^\s*\d+\s+([\d.]+).*psycopg2", profile, re.M))
    items = int(re.search(r"^\s*(\d+)\s.*'commit' of 'psycopg2", profile, re.M).group(1))
    return driver / total, (total - driver) / items * 1e6, items


def measure_scaling(b: Bench) -> list[dict]:
    per_worker = 30 if b.quick else 150
    return [
        r
        for name, url in b.databases
        for r in bench_scaling(name, url, b.runs, per_worker, [1, 2, 4, 8, 16, 32])
    ]


def render_scaling(rows: list[dict], _all: dict) -> str:
    plot(rows, HERE / "throughput.png")
    return f"""## 3. Scaling: I/O-bound items

Each item waits 10 ms outside the database (before its transaction), then runs the UPDATE and
commits. Items per second from the run's own `--json` summary. Target: 16 workers at least 12x one.

{
        table(
            rows,
            [
                ("db", "database", "s"),
                ("workers", "workers", "d"),
                ("items_per_s", "items/s", ".1f"),
                ("speedup", "x one worker", ".2f"),
            ],
        )
    }

![throughput against workers](bench/throughput.png)"""


def measure_memory(b: Bench) -> list[dict]:
    sizes = [10_000, 100_000] if b.quick else [100_000, 1_000_000]
    return [r for name, url in b.databases[:2] for r in bench_memory(name, url, sizes)]


def render_memory(rows: list[dict], _all: dict) -> str:
    mem = {(m["db"], m["items"]): m["peak_rss_mb"] for m in rows}
    growth = []
    for db in sorted({d for d, _ in mem}, reverse=True):
        sizes = sorted(n for d, n in mem if d == db)
        small, large = mem[(db, sizes[0])], mem[(db, sizes[-1])]
        growth.append({"db": db, "small": small, "large": large, "growth": (large / small - 1) * 100})
    return f"""## 4. Memory

Peak RSS of the whole `jobrunner run` process for a generator of no-op items. Target: less than
10% growth from the smaller to the larger run.

{
        table(
            rows,
            [
                ("db", "database", "s"),
                ("items", "items", ",d"),
                ("peak_rss_mb", "peak RSS MiB", ".1f"),
                ("seconds", "wall s", ".1f"),
            ],
        )
    }

{
        table(
            growth,
            [
                ("db", "database", "s"),
                ("small", "smaller MiB", ".1f"),
                ("large", "larger MiB", ".1f"),
                ("growth", "growth %", ".2f"),
            ],
        )
    }"""


def measure_lock(b: Bench) -> dict:
    return {
        "lock": [bench_lock(name, url, b.runs) for name, url in b.databases],
        "vacuum": bench_vacuum(b.pg_url),
    }


def render_lock(data: dict, _all: dict) -> str:
    return f"""## 5. The lock

Loser: whole-process wall time of a second `jobrunner run` while a copy holds the lock (exit 75).
Takeover: from SIGKILL of the holder to the first item of a copy already waiting with
`--wait-lock` (it polls every 0.1 s).

{
        table(
            data["lock"],
            [
                ("db", "database", "s"),
                ("loser_exit_s", "loser exits in s", ".3f"),
                ("takeover_s", "takeover after SIGKILL s", ".3f"),
            ],
        )
    }

VACUUM while a run holds its lock and another session updates 1,000 rows (PostgreSQL):

{
        table(
            data["vacuum"],
            [
                ("lock", "lock mode", "s"),
                ("dead_removed", "dead rows removed", "d"),
                ("dead_not_removable", "dead but not yet removable", "d"),
            ],
        )
    }"""


def render_startup(rows: list[dict], _all: dict) -> str:
    return f"""## 6. Start-up

Target: under 250 ms each.

{table(rows, [("command", "command", "s"), ("median_ms", "median ms", ".0f")])}

`jobrunner --help` and `jobrunner list` import neither SQLAlchemy nor rich: `list` reads each job's
docstring with `ast` instead of importing the module."""


def measure_batches(b: Bench) -> list[dict]:
    return bench_batches(
        "production-like", b.prod_url, b.batch_runs, b.batch_items, [1, 4, 16]
    ) + bench_batches("fsync off", b.pg_url, b.batch_runs, b.batch_items, [1, 4, 16])


def measure_dry_run(b: Bench) -> list[dict]:
    return [
        bench_dry_run("sqlite", lambda tag: f"sqlite:///{b.work / f'dry-{tag}.db'}", b.batch_runs),
        bench_dry_run("postgresql", lambda tag: b.fresh_pg(f"dry_{tag}"), b.batch_runs),
    ]


def tabled(heading: str, intro: str, columns: list[tuple[str, str, str]]) -> Callable[[Any, dict], str]:
    """The render of a section that is its heading, a paragraph and one table."""

    def render(rows: list[dict], _all: dict) -> str:
        return f"## {heading}\n\n{intro}\n\n" + table(rows, columns)

    return render


render_isolation = tabled(
    "8. The safe isolation default costs",
    "The UPDATE job at 4 workers, one item per transaction, on the production-like server, "
    "at each isolation level, side by side (items/s of processing, median).",
    [
        ("isolation", "isolation", "s"),
        ("items_per_s", "items/s", ".0f"),
        ("vs_rc", "x read_committed", ".3f"),
    ],
)


render_dry_run = tabled(
    "9. A dry run against a real run",
    "The example job (`jobs/update.py`: creates and seeds 2,000 products, then reprices each) on a "
    "fresh database, whole process, `-w 4`. The dry run is one transaction, one item at a time.",
    [
        ("db", "database", "s"),
        ("real_s", "real run s", ".2f"),
        ("dry_s", "dry run s", ".2f"),
        ("ratio", "dry / real", ".2f"),
    ],
)


render_sqlite_slow = tabled(
    "10. SQLite and slow items",
    "Each item reads a row, makes a 0.2 s call, and writes the row back: the call inside "
    "`process()` (holding SQLite's write lock) or in `prepare()` (before the transaction). "
    "Whole-process seconds.",
    [
        ("where", "slow call in", "s"),
        ("workers", "workers", "d"),
        ("items", "items", "d"),
        ("seconds", "seconds", ".1f"),
    ],
)


render_restart = tabled(
    "11. A server restart mid-run",
    "20,000 UPDATE items at 4 workers on the production-like server; `pg_ctl restart -m fast` "
    "2.5 s in. `waited` is the longest wait for the database the run reported.",
    [
        ("lock", "lock", "s"),
        ("exit", "exit", "d"),
        ("succeeded", "succeeded", "d"),
        ("failed", "failed", "d"),
        ("restart_s", "restart took s", ".2f"),
        ("waited_s", "run waited s", ".2f"),
        ("retaken", "lock retaken", ""),
        ("errors", "why items failed", ""),
    ],
)


render_vacuum_items = tabled(
    "12. VACUUM and how items() reads",
    "A run with the advisory lock reads 100,000 ids; meanwhile another session updates 1,000 "
    "rows of another table and VACUUMs it (fsync-off server).",
    [
        ("items", "items() reads with", "s"),
        ("dead_removed", "dead rows removed", "d"),
        ("dead_not_removable", "dead but not yet removable", "d"),
    ],
)


def render_processes(p: dict, results: dict) -> str:
    batch1 = _batch1_rate(results.get("batches", []))
    return (
        "## 13. One run over several processes\n\n"
        "The same total of 8 worker threads, in one process or in two (`--processes 2`), batch 50, "
        "fsync-off server. CPU-bound: each item spends 2 ms of its thread's CPU in pure Python, then "
        "runs one UPDATE. I/O-bound: each item waits 10 ms, then runs the UPDATE. Items/s of "
        "processing, median, over runs of a few seconds and of about 20-30 s. Targets: CPU-bound, "
        "2 processes at least 1.7x one; I/O-bound, 2 processes not slower than one. The second "
        "process is spawned (a fresh interpreter, which imports jobrunner and SQLAlchemy) once the "
        "run holds its lock: until it claims its first chunk, about a second on this machine, the "
        "run has half its threads, which a run of a few seconds feels and a longer one does not.\n\n"
        + table(
            p["scale"],
            [
                ("items", "items", "s"),
                ("n", "n", ",d"),
                ("layout", "layout", "s"),
                ("seconds", "processing s", ".1f"),
                ("items_per_s", "items/s", ".0f"),
                ("x_one", "x one process", ".2f"),
            ],
        )
        + "\n\nThe work table's own cost: no-op items at 4 workers, one process, the in-memory feed "
        "against the work table (`--join`: fed by the leader, claimed with SKIP LOCKED, each item's row "
        "deleted in its chunk's transaction). Microseconds of processing per item. Target: under 15% "
        "of a batch-1 item"
        + (
            f" (section 7: about {1e6 / batch1:.0f} us on the production-like server at 4 workers)"
            if batch1
            else ""
        )
        + ".\n\n"
        + table(
            p["cost"],
            [
                ("batch", "batch size", "d"),
                ("memory_us", "in memory us", ".1f"),
                ("table_us", "work table us", ".1f"),
                ("cost_us", "cost us per item", ".1f"),
            ],
        )
        + "\n\nPeak RSS of the leader (the whole process) feeding no-op items through the work table:\n\n"
        + table(
            p["memory"],
            [
                ("items", "items", ",d"),
                ("peak_rss_mb", "peak RSS MiB", ".1f"),
                ("seconds", "wall s", ".1f"),
            ],
        )
    )


def _batch1_rate(rows: list[dict]) -> float:
    for row in rows:
        if row["profile"] == "production-like" and row["workers"] == 4:
            return row["batch 1"]
    return 0.0


BATCH_CONTENDERS = (
    "hand-written",
    "batch 1",
    "batch 10",
    "batch 100",
    "batch 1000",
    "process_batch 100",
    "process_batch 1000",
    "psycopg2 per item",
    "psycopg2 per 100",
    "pgbench",
)


def render_batches(rows: list[dict], _all: dict) -> str:
    plot_batches(rows, HERE / "batches.png")
    columns = [("profile", "server", "s"), ("workers", "workers", "d")] + [
        (label, label, ".0f") for label in BATCH_CONTENDERS
    ]
    prod = {row["workers"]: row for row in rows if row["profile"] == "production-like"}
    checks = []
    if 4 in prod:
        ratio = prod[4]["batch 100"] / prod[4]["batch 1"]
        checks.append(f"- batch 100 against batch 1 at 4 workers: **{ratio:.2f}x** (target at least 5x)")
    for workers, row in sorted(prod.items()):
        ratio = row["psycopg2 per 100"] / row["process_batch 1000"]
        checks.append(
            f"- raw psycopg2 per 100 against process_batch 1000 at {workers} workers: **{ratio:.2f}x** "
            "(target at most 1.5x)"
        )
    for workers, row in sorted(prod.items()):
        ratio = row["hand-written"] / row["batch 1"]
        checks.append(
            f"- the hand-written script against batch 1 at {workers} workers: **{ratio:.3f}x** "
            "(target at most 1.05x)"
        )
    return (
        "## 7. Batches: several items per transaction\n\n"
        "Items per second of processing (each contender's own clock, start-up excluded), median of the "
        "runs, contenders alternating. Every item is `UPDATE bench_rows SET n = n + 1 WHERE id = :id`. "
        "`batch N`: jobrunner with `--batch-size N` and the per-item `process()`; `process_batch N`: one "
        "`UPDATE ... WHERE id IN (...)` per chunk; `psycopg2 per item / per 100`: the driver alone, one "
        "connection per thread, a commit per item or per 100 statements; `pgbench`: the server's own "
        "rate for the same UPDATE, one per transaction, as many clients as workers.\n\n"
        + table(rows, columns)
        + "\n\nTargets, production-like server:\n\n"
        + "\n".join(checks)
        + "\n\n![items/s against workers, both servers](bench/batches.png)"
    )


def plot_batches(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = sorted({r["profile"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(profiles), figsize=(12, 4.8), sharey=True, squeeze=False)
    for ax, profile in zip(axes[0], profiles, strict=True):
        points = [r for r in rows if r["profile"] == profile]
        workers = [p["workers"] for p in points]
        for label in BATCH_CONTENDERS:
            style = ":" if label.startswith(("psycopg2", "pgbench")) else "-"
            ax.plot(workers, [p[label] for p in points], marker="o", linestyle=style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(workers, [str(w) for w in workers])
        ax.set_xlabel("workers (pgbench: clients)")
        ax.set_title(f"PostgreSQL, {profile}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("items per second (median)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("One UPDATE per item: per-item commits, chunks, set-based, and the limits")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot(scaling: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for db in sorted({r["db"] for r in scaling}):
        points = [r for r in scaling if r["db"] == db]
        ax.plot([p["workers"] for p in points], [p["items_per_s"] for p in points], marker="o", label=db)
    workers = sorted({r["workers"] for r in scaling})
    one = {
        db: next(r["items_per_s"] for r in scaling if r["db"] == db and r["workers"] == 1)
        for db in {r["db"] for r in scaling}
    }
    ideal = max(one.values())
    ax.plot(workers, [ideal * w for w in workers], linestyle=":", color="grey", label="linear")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(workers, [str(w) for w in workers])
    ax.set_xlabel("--workers")
    ax.set_ylabel("items per second (median)")
    ax.set_title("I/O-bound items (UPDATE + 10 ms wait): throughput vs workers")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# The whole of BENCHMARKS.md, in its order (section 13 was measured before 12
# and has stayed there). `--only` names a key; a section not measured in this
# run keeps its text from the file as it is.
SECTIONS: tuple[Section, ...] = (
    Section("overhead", (1, 2), measure_overhead, render_overhead),
    Section("scaling", (3,), measure_scaling, render_scaling),
    Section("memory", (4,), measure_memory, render_memory),
    Section("lock", (5,), measure_lock, render_lock),
    Section("startup", (6,), lambda b: bench_startup(max(b.runs, 10), b.sqlite_url), render_startup),
    Section("batches", (7,), measure_batches, render_batches),
    Section(
        "isolation", (8,), lambda b: bench_isolation(b.prod_url, b.runs, b.batch_items), render_isolation
    ),
    Section("dry_run", (9,), measure_dry_run, render_dry_run),
    Section(
        "sqlite_slow",
        (10,),
        lambda b: bench_sqlite_slow(f"sqlite:///{b.work / 'slow.db'}", 20 if b.quick else 50),
        render_sqlite_slow,
    ),
    Section("restart", (11,), lambda b: bench_restart(b.durable, b.prod_url), render_restart),
    Section("processes", (13,), lambda b: bench_processes(b.pg_url, b.batch_runs, b.quick), render_processes),
    Section("vacuum_items", (12,), lambda b: bench_vacuum_items(b.pg_url), render_vacuum_items),
    Section("bad_items", (14,), scripts=("bench/bad_items.py",)),
    Section("async_items", (15,), scripts=("bench/async_items.py",)),
    Section("versions", (16,), scripts=("bench/versions.py", "bench/begin_cost.py", "bench/item_profile.py")),
    Section("hot_rows", (17,), scripts=("bench/hot_rows.py",)),
    Section("vacuum_distributed", (18,), scripts=("bench/vacuum_distributed.py",)),
    Section("claims", (19,), scripts=("bench/claims.py",)),
)
MEASURED = tuple(s.key for s in SECTIONS if s.measure is not None)
RESULTS_FORMAT = 2  # latest.json: {"format", "results": {key: {"measured", "command", "quick", "data"}}}


def file_parts(path: Path) -> dict[int, str]:
    """The numbered parts ("## 7. ...") of the file as it is, by number."""
    if not path.exists():
        return {}
    text_ = path.read_text()
    starts = [m.start() for m in re.finditer(r"^## ", text_, flags=re.MULTILINE)] + [len(text_)]
    parts = {}
    for a, b in itertools.pairwise(starts):
        match = re.match(r"## (\d+)\. ", text_[a:b])
        if match:
            parts[int(match.group(1))] = text_[a:b].rstrip()
    return parts


def section_text(
    section: Section, results: dict[str, Any], kept: dict[int, str], rewrite: set[str]
) -> list[str]:
    """The section's parts: rendered from its results if it is to be rewritten,
    else as the file has them, else a line saying how to measure it."""
    saved = results.get(section.key)
    if section.key in rewrite and saved is not None and section.render is not None:
        data = {key: value["data"] for key, value in results.items()}
        quick = " (smoke-test sizes: not for quoting)" if saved["quick"] else ""
        stamp = f"Measured on {saved['measured']} by `{saved['command']}`{quick}."
        return [section.render(saved["data"], data).rstrip() + "\n\n" + stamp]
    parts = []
    for number in section.numbers:
        if number in kept:
            parts.append(kept[number])
        else:
            how = (
                f"`python bench/run.py --only {section.key}`"
                if section.measure is not None
                else ", ".join(f"`python {script}`" for script in section.scripts)
                + " (its output is written here by hand)"
            )
            parts.append(f"## {number}. {section.key.replace('_', ' ')}\n\nNot measured yet: {how}.")
    return parts


def write_report(results: dict[str, Any], path: Path, rewrite: set[str]) -> None:
    """BENCHMARKS.md with the sections named in ``rewrite`` rendered from
    ``results`` and every other part as the file has it."""
    kept = file_parts(path)
    body = [part for section in SECTIONS for part in section_text(section, results, kept, rewrite)]
    owned = {n for section in SECTIONS for n in section.numbers}
    body += [kept[n] for n in sorted(kept) if n not in owned]  # a part no section owns: kept, last
    path.write_text(header() + "\n\n" + "\n\n".join(body) + "\n\n" + LIMITS.format(cores=os.cpu_count()))


def header() -> str:
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    import sqlalchemy

    return f"""# Benchmarks

Sections 1-13 are written by `python bench/run.py`, each with the day it was measured; 14-19 by hand
from what their own scripts print. This copy: {os.cpu_count()} cores ({model}), {platform.system()}
{platform.release()}, Python {platform.python_version()}, SQLAlchemy {sqlalchemy.__version__}. PostgreSQL
servers started by the benchmark on the same machine over loopback TCP: sections 1-6 and 12 on one
with fsync off (labelled "fsync off"), sections 7, 8 and 11 also or only on a production-like one
(fsync, synchronous_commit and full_page_writes on, the defaults); MariaDB {_mariadb_version()} started
by the benchmark the same way (innodb_flush_log_at_trx_commit=0: not durable, like the fsync-off
PostgreSQL); SQLite in WAL mode with synchronous=FULL on local disk. Every timing is the median of
the section's runs (5 unless `--runs` says otherwise); contenders in a comparison ran side by side
in the same loop, alternating. Raw numbers: `bench/results/latest.json` (not committed)."""


LIMITS = """## What limits these numbers

- The machine has {cores} cores, shared by the benchmark, the contenders and the PostgreSQL
  server. CPU-bound work under the GIL (SQLAlchemy's per-statement Python) cannot use more than
  about one core per process, so with several workers the per-item Python cost, not the
  database, sets the pace in sections 1 and 2.
- PostgreSQL runs with fsync off on loopback: commits are cheaper than on a production server,
  which makes jobrunner's and SQLAlchemy's share of each item look larger than it would be
  there. SQLite commits do fsync (WAL, synchronous=FULL, about 130 us each on this disk).
- SQLite has one writer at a time: workers take turns on the write lock, so more workers help
  only while items spend time outside the database (section 3). At 32 workers SQLite falls
  below linear as the turns queue up in SQLite's busy handler.
- Section 1 measures whole processes, start-up included (about 0.1-0.2 s of each run): the
  lock, the schema check and the history row are fixed costs that 20,000 items dilute.
"""


def _mariadb_version() -> str:
    try:
        out = subprocess.run(["mariadbd", "--version"], capture_output=True, text=True).stdout
    except OSError:
        return ""
    words = out.split()
    return words[2].split("-")[0] if len(words) > 2 else ""


def load_results(path: Path) -> dict[str, Any]:
    """The saved results, by section; none from an older format."""
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    return saved.get("results", {}) if saved.get("format") == RESULTS_FORMAT else {}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a smoke test: 2 runs, fewer items")
    parser.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    parser.add_argument(
        "--only",
        help=f"comma-separated sections to measure ({', '.join(MEASURED)}); "
        "the others keep their text in the output file",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the report from bench/results/latest.json, measuring nothing",
    )
    args = parser.parse_args()
    latest = HERE / "results" / "latest.json"
    output = Path(args.output)
    if args.report_only:
        results = load_results(latest)
        write_report(results, output, set(results))
        return
    only = args.only.split(",") if args.only else list(MEASURED)
    unknown = set(only) - set(MEASURED)
    if unknown:
        hand = {s.key: s.scripts for s in SECTIONS if not s.measure}
        parser.error(
            "; ".join(
                f"{key} is measured by {', '.join(hand[key])}" if key in hand else f"no section {key}"
                for key in sorted(unknown)
            )
        )
    runs = 2 if args.quick else args.runs
    results = load_results(latest) if args.only else {}
    (HERE / "results").mkdir(exist_ok=True)

    # Two servers side by side: fsync off (the first benchmarks' profile, kept for
    # comparison) and production-like (fsync and synchronous_commit on, the
    # defaults a real server runs with). Both on this machine, over loopback.
    from mysqlserver import MariaDBServer, find_server
    from pgserver import PostgresServer, find_bindir

    fast, durable = PostgresServer(find_bindir()), PostgresServer(find_bindir(), durable=True)
    mariadb = MariaDBServer(*find_server())
    work = Path(tempfile.mkdtemp(prefix="jobrunner-bench-"))
    counter = itertools.count()
    try:
        fast.start()
        durable.start()
        mariadb.start()
        bench = Bench(
            runs=runs,
            quick=args.quick,
            items=2000 if args.quick else 20000,
            sqlite_url=f"sqlite:///{work / 'bench.db'}",
            pg_url=_database(fast, "bench"),
            prod_url=_database(durable, "bench"),
            maria_url=_mysql_database(mariadb, "bench"),
            durable=durable,
            fresh_pg=lambda name: _database(fast, f"{name}_{next(counter)}"),
            work=work,
        )
        for section in SECTIONS:
            if section.key not in only or section.measure is None:
                continue
            print(section.key, flush=True)
            data = section.measure(bench)
            command = ["python bench/run.py", "--only", section.key]
            command += ["--quick"] if args.quick else [] if args.runs == 5 else ["--runs", str(args.runs)]
            results[section.key] = {
                "measured": time.strftime("%Y-%m-%d"),
                "command": " ".join(command),
                "quick": args.quick,
                "data": data,
            }
            # After every section: a run cut short keeps what it measured.
            latest.write_text(json.dumps({"format": RESULTS_FORMAT, "results": results}, indent=2))
    finally:
        fast.stop()
        durable.stop()
        mariadb.stop()
        shutil.rmtree(work, ignore_errors=True)
    # Only this run's sections are rewritten; the others keep their text.
    write_report(results, output, set(only))
    print(f"wrote {output} (sections {', '.join(only)})")


def _mysql_database(server, name: str) -> str:
    admin = create_engine(server.admin_url)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return server.admin_url.rsplit("/", 1)[0] + f"/{name}"


def _database(server, name: str) -> str:
    admin = create_engine(server.admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return server.admin_url.rsplit("/", 1)[0] + f"/{name}"


if __name__ == "__main__":
    main()
