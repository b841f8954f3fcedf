"""Async jobs (``async def process``), run as a user runs them: ``jobrunner`` in
a subprocess against real SQLite files, PostgreSQL and MariaDB servers, with
real signals and SIGKILL."""

from __future__ import annotations

import itertools
import json
import signal
import threading
import time
from collections import defaultdict

import pytest
from helpers import assert_whole_items, finish, kill_lock_connection, query, wait_for_rows
from jobkit import ASYNC_PAGED, ASYNC_PAIRS, ASYNC_RECORD


def effects(url: str) -> list[tuple]:
    return query(url, "SELECT item, task, sess, t0, t1 FROM effects")


def assert_each_once(url: str, n: int, missing: frozenset[int] = frozenset()) -> None:
    items = sorted(row[0] for row in query(url, "SELECT item FROM effects"))
    assert items == [i for i in range(n) if i not in missing], (
        f"{len(items)} effect rows, {len(set(items))} distinct, {n} items"
    )


def test_an_async_job_does_each_item_once_with_an_async_session_per_task(cli, write_job, db_url):
    """Every chunk's transaction is a task holding one of the workers' sessions:
    no session served two tasks at once. A bad item fails alone."""
    write_job("arecord", ASYNC_RECORD)
    out = cli(
        "run", "arecord", "--database-url", db_url, "--param", "n=300", "--param", "bad=7",
        "--param", "sleep=0.01", "--concurrency", "50", "--workers", "4", "--json",
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    summary = json.loads(out.stdout)
    assert (summary["succeeded"], summary["failed"]) == (299, 1)
    assert summary["failures"] == [{"item": "7", "error": "ValueError: item 7 is bad"}]
    assert_each_once(db_url, 300, missing=frozenset({7}))
    spans = defaultdict(list)
    for _, task, session, t0, t1 in effects(db_url):
        spans[session].append((t0, t1, task))
    for session, used in spans.items():
        used.sort()
        for (_, end, task), (start, _, other) in itertools.pairwise(used):
            assert start >= end, f"session {session} served {task} and {other} at once"
    assert len(spans) <= 4  # a session per worker, each used by one task at a time
    assert "Traceback" not in out.stderr and "never awaited" not in out.stderr


def test_bad_items_in_async_chunks_are_isolated_and_the_rest_commit(cli, write_job, db_url):
    write_job("arecord", ASYNC_RECORD)
    out = cli(
        "run", "arecord", "--database-url", db_url, "--param", "n=200", "--param", "bad=3,150",
        "--batch-size", "20", "--json",
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    summary = json.loads(out.stdout)
    assert (summary["succeeded"], summary["failed"]) == (198, 2)
    assert summary["commits"] <= 10 + 2  # the bad items cost savepoints, not a transaction per item
    assert_each_once(db_url, 200, missing=frozenset({3, 150}))


@pytest.mark.postgres
def test_concurrency_bounds_items_in_flight_and_workers_bound_connections(cli, write_job, pg_url):
    """2,000 items each awaiting 0.2 s in prepare at --concurrency 400 --workers 4:
    about 400 in flight (so a few seconds, not 100 s), on W + a few connections."""
    write_job("arecord", ASYNC_RECORD)
    database = pg_url.rsplit("/", 1)[1]
    peak_connections = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            [(count,)] = query(
                pg_url,
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'jobrunner arecord%' "
                f"AND datname = '{database}'",
            )
            peak_connections[0] = max(peak_connections[0], count)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        t0 = time.monotonic()
        out = cli(
            "run", "arecord", "--database-url", pg_url, "--param", "n=2000", "--param", "wait=0.2",
            "--concurrency", "400", "--workers", "4", "--json",
        )  # fmt: skip
        took = time.monotonic() - t0
    finally:
        done.set()
        watcher.join()
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["succeeded"] == 2000
    assert_each_once(pg_url, 2000)
    [(peak,)] = query(pg_url, "SELECT max(peak) FROM effects")
    assert 300 <= peak <= 400, peak
    assert took < 30, took
    # 4 workers, the items reader, setup's, the lock and jobrunner's own rows
    assert 0 < peak_connections[0] <= 4 + 5, peak_connections[0]


AWAITING = """
import asyncio
from sqlalchemy import text

state = {"awaiting": 0, "most": 0}

async def setup(ctx, session):
    await session.execute(text("CREATE TABLE IF NOT EXISTS effects (item INTEGER NOT NULL, most INTEGER)"))

async def items(ctx, session):
    return range(int(ctx.params["n"]))

async def prepare(ctx, item):
    state["awaiting"] += 1
    state["most"] = max(state["most"], state["awaiting"])
    try:
        await asyncio.sleep(float(ctx.params.get("wait", 0.05)))
        if item == 7:
            raise ValueError("item 7 cannot be prepared")
    finally:
        state["awaiting"] -= 1
    return item

async def process(ctx, session, item):
    await session.execute(text("INSERT INTO effects VALUES (:i, :m)"), {"i": item, "m": state["most"]})
"""


IN_TRANSACTION = """
import asyncio
from sqlalchemy import text

state = {"open": 0, "most": 0}

async def setup(ctx, session):
    await session.execute(text("CREATE TABLE IF NOT EXISTS effects (item INTEGER NOT NULL, most INTEGER)"))

async def items(ctx, session):
    return range(int(ctx.params["n"]))

async def process_batch(ctx, session, items):
    state["open"] += 1
    state["most"] = max(state["most"], state["open"])
    try:
        await asyncio.sleep(0.3)
        await session.execute(
            text("INSERT INTO effects VALUES (:i, :m)"), [{"i": i, "m": state["most"]} for i in items]
        )
    finally:
        state["open"] -= 1
"""


@pytest.mark.postgres
def test_by_default_every_worker_of_an_async_run_has_a_chunk_whatever_the_batch_size(cli, write_job, pg_url):
    """-w 4 -b 50 with no --concurrency: four chunks' transactions at once. The
    default of 100 items in flight let two chunks of 50 be, so two of the four
    workers never had one."""
    write_job("intx", IN_TRANSACTION)
    out = cli(
        "run", "intx", "--database-url", pg_url, "--param", "n=800",
        "-w", "4", "-b", "50", "--fixed-batch-size", "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["commits"] == 16
    assert_each_once(pg_url, 800)
    [(most,)] = query(pg_url, "SELECT max(most) FROM effects")
    assert most == 4, most
    assert "up to 200 items in flight" in out.stderr, out.stderr


def test_an_async_chunks_prepares_await_at_once_within_the_concurrency_bound(cli, write_job, db_url):
    """At --concurrency 40 --batch-size 40 one chunk is in flight at a time: its
    items' prepare() calls await together (one after another, 40 items that
    each wait would make each chunk wait 40 times as long), never more than
    40 at once; the item whose prepare raised fails alone."""
    write_job("awaiting", AWAITING)
    out = cli(
        "run", "awaiting", "--database-url", db_url, "--param", "n=200",
        "--concurrency", "40", "--batch-size", "40", "--fixed-batch-size", "--workers", "2", "--json",
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    summary = json.loads(out.stdout)
    assert (summary["succeeded"], summary["failed"]) == (199, 1)
    assert summary["failures"] == [{"item": "7", "error": "ValueError: item 7 cannot be prepared"}]
    assert_each_once(db_url, 200, missing=frozenset({7}))
    [(most,)] = query(db_url, "SELECT max(most) FROM effects")
    assert 1 < most <= 40, most
    assert "Traceback" not in out.stderr and "never awaited" not in out.stderr


def test_a_stop_past_the_shutdown_timeout_cancels_a_chunks_prepares_and_counts_them_once(
    spawn, write_job, sqlite_url
):
    """SIGTERM while a chunk's 40 prepare() calls await together, with
    --shutdown-timeout 1: they are cancelled, the chunk is rolled back (counted
    once), and the run exits 143 at once, without a traceback or a warning."""
    write_job("awaiting", AWAITING)
    run = spawn(
        "run", "awaiting", "--database-url", sqlite_url, "--param", "n=100", "--param", "wait=60",
        "--concurrency", "40", "--batch-size", "40", "--fixed-batch-size", "--shutdown-timeout", "1",
        "--json",
    )  # fmt: skip
    wait_for_rows(sqlite_url, "jobrunner_runs", minimum=1)
    time.sleep(1.5)  # the first chunk's prepares are awaiting their 60 s
    t0 = time.monotonic()
    run.send_signal(signal.SIGTERM)
    rc, out, err = finish(run, timeout=30)
    assert rc == 143, err
    assert time.monotonic() - t0 < 15
    summary = json.loads(out)
    assert (summary["succeeded"], summary["failed"], summary["rolled_back"]) == (0, 0, 40), summary
    assert query(sqlite_url, "SELECT count(*) FROM effects") == [(0,)]
    assert "Traceback" not in err and "never awaited" not in err and "destroyed" not in err


def test_an_async_dry_run_changes_nothing_and_reports_what_it_would(cli, write_job, db_url):
    write_job("arecord", ASYNC_RECORD)
    made = cli("run", "arecord", "--database-url", db_url, "--param", "n=0")  # the table, empty
    assert made.returncode == 0, made.stderr
    out = cli("run", "arecord", "--database-url", db_url, "--param", "n=30", "--dry-run", "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["dry_run"] is True and summary["succeeded"] == 30
    assert summary["changes"]["effects"]["insert"] == 30
    assert query(db_url, "SELECT count(*) FROM effects") == [(0,)]


@pytest.mark.postgres
def test_async_items_from_paged_sigkill_then_resume_does_each_item_once(
    cli, spawn, write_job, pg_url, tmp_path
):
    """And history and the metrics file count what the killed run committed."""
    write_job("apaged", ASYNC_PAGED)
    args = ("run", "apaged", "--database-url", pg_url, "--metrics-file", "m.prom")
    run = spawn(*args, "--param", "n=400", "--param", "sleep=0.05")
    wait_for_rows(pg_url, "effects", minimum=40)
    run.send_signal(signal.SIGKILL)
    finish(run)
    [(committed,)] = query(pg_url, "SELECT count(*) FROM effects")
    out = cli(*args, "--param", "sleep=0", "--resume", "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["skipped"] == committed and summary["succeeded"] + summary["skipped"] == 400
    assert sorted(i for (i,) in query(pg_url, "SELECT item FROM effects")) == list(range(400))
    runs = json.loads(cli("history", "--database-url", pg_url, "--json").stdout)
    [killed] = [r for r in runs if r["id"] == 1]
    assert killed["status"] == "crashed" and killed["succeeded"] == committed
    text = (tmp_path / "m.prom").read_text()
    assert 'jobrunner_items_total{job="apaged",outcome="succeeded"} 400' in text, text


def test_a_second_copy_of_an_async_job_exits_75(cli, spawn, write_job, db_url):
    write_job("apairs", ASYNC_PAIRS)
    first = spawn("run", "apairs", "--database-url", db_url, "--param", "n=40", "--param", "sleep=0.2")
    wait_for_rows(db_url, "pairs", minimum=2)
    second = cli("run", "apairs", "--database-url", db_url)
    assert second.returncode == 75, second.stderr
    code, _, err = finish(first)
    assert code == 0, err
    assert_whole_items(db_url)


@pytest.mark.postgres
def test_async_items_in_flight_when_the_lock_connection_dies_do_not_commit(spawn, write_job, pg_url):
    write_job("apairs", ASYNC_PAIRS)
    run = spawn(
        "run", "apairs", "--database-url", pg_url, "--param", "n=12", "--param", "sleep=2",
        "--heartbeat", "0.2", "--json",
    )  # fmt: skip
    wait_for_rows(pg_url, "jobrunner_runs")
    time.sleep(1.0)  # the first four items are half-way through
    killed_at = time.time()
    killed = kill_lock_connection(pg_url, "apairs")
    assert killed == [(True,)]
    code, _, err = finish(run, timeout=60)
    assert code == 0, err
    assert "lock in doubt" in err and "lock taken again" in err
    stale = query(pg_url, f"SELECT item, t0, t1 FROM pairs WHERE part = 2 AND t0 < {killed_at}")
    assert stale == [], f"items begun before the loss committed after it: {stale}"
    assert_whole_items(pg_url)
    assert sorted(i for (i,) in query(pg_url, "SELECT item FROM pairs WHERE part = 2")) == list(range(12))


@pytest.mark.postgres
def test_a_fast_restart_mid_async_run_fails_no_item(spawn, write_job, own_pg, own_pg_url):
    write_job("apaged", ASYNC_PAGED)
    run = spawn("run", "apaged", "--database-url", own_pg_url, "--param", "n=400", "--json")
    wait_for_rows(own_pg_url, "effects", minimum=60)
    own_pg.pg_ctl("-m", "fast", "-w", "restart")
    code, out, err = finish(run)
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["succeeded"], summary["failed"]) == (400, 0)
    assert "the database is unreachable" in err and "the database is back" in err
    assert sorted(i for (i,) in query(own_pg_url, "SELECT item FROM effects")) == list(range(400))


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_lets_async_items_in_flight_finish_whole(spawn, write_job, db_url, signum, code):
    write_job("apairs", ASYNC_PAIRS)
    run = spawn(
        "run", "apairs", "--database-url", db_url, "--param", "n=400", "--param", "sleep=0.3",
        "--concurrency", "8", "--json",
    )  # fmt: skip
    wait_for_rows(db_url, "pairs", minimum=8)
    run.send_signal(signum)
    rc, out, err = finish(run, timeout=30)
    assert rc == code, err
    summary = json.loads(out)
    assert summary["status"] == "interrupted" and 0 < summary["succeeded"] < 400
    assert_whole_items(db_url)
    [(done,)] = query(db_url, "SELECT count(*) FROM pairs WHERE part = 2")
    assert done == summary["succeeded"]
    assert "Traceback" not in err and "never awaited" not in err and "destroyed" not in err


def test_a_job_that_blocks_the_event_loop_is_told_once(cli, write_job, sqlite_url):
    write_job("apairs", ASYNC_PAIRS)
    out = cli(
        "run", "apairs", "--database-url", sqlite_url, "--param", "n=20", "--param", "sleep=0.05",
        "--param", "block=3",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "items of 20" in out.stdout + out.stderr  # the async count(), awaited on its session
    lines = [line for line in out.stderr.splitlines() if "event loop" in line]
    assert len(lines) == 1, out.stderr
    assert "process()" in lines[0] and "apairs.py" in lines[0]


@pytest.mark.postgres
def test_a_distributed_async_run_does_each_item_once_over_processes(cli, write_job, pg_url):
    write_job("arecord", ASYNC_RECORD)
    out = cli(
        "run", "arecord", "--database-url", pg_url, "-P", "2", "-b", "5", "--param", "n=600",
        "--param", "bad=17", "--param", "sleep=0.002", "--json",
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    summary = json.loads(out.stdout)
    assert (summary["succeeded"], summary["failed"], summary["processes"]) == (599, 1, 2)
    assert_each_once(pg_url, 600, missing=frozenset({17}))


@pytest.mark.postgres
def test_a_distributed_async_run_fails_an_item_whose_prepare_raises_alone(cli, write_job, pg_url):
    """The chunk's transaction holds its claim while prepare() runs: an item
    whose prepare raised fails in that transaction, not as done."""
    write_job("arecord", ASYNC_RECORD)
    out = cli(
        "run", "arecord", "--database-url", pg_url, "-P", "2", "-b", "5", "--param", "n=300",
        "--param", "unprepared=0,1,2,3,4,150", "--param", "wait=0", "--json",
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    summary = json.loads(out.stdout)
    assert (summary["succeeded"], summary["failed"]) == (294, 6)
    assert sorted(int(f["item"]) for f in summary["failures"]) == [0, 1, 2, 3, 4, 150]
    assert_each_once(pg_url, 300, missing=frozenset({0, 1, 2, 3, 4, 150}))


@pytest.mark.postgres
def test_an_async_join_helper_killed_mid_run_gives_its_items_back(spawn, write_job, pg_url):
    write_job("apaged", ASYNC_PAGED)
    args = ("run", "apaged", "--database-url", pg_url, "--join", "-b", "10", "--param", "n=1500")
    leader = spawn(*args, "--param", "sleep=0.004", "--json")
    wait_for_rows(pg_url, "effects", minimum=20)
    helper = spawn(*args, "--param", "sleep=0.004")
    time.sleep(1.5)
    helper.send_signal(signal.SIGKILL)
    finish(helper)
    code, out, err = finish(leader)
    assert code == 0, err
    assert json.loads(out)["succeeded"] == 1500
    assert sorted(i for (i,) in query(pg_url, "SELECT item FROM effects")) == list(range(1500))


def test_a_job_mixing_async_and_plain_hooks_is_refused(cli, write_job, sqlite_url):
    write_job(
        "mixed",
        """
        async def items(ctx, session):
            yield 1

        def process(ctx, session, item):
            pass
        """,
    )
    out = cli("run", "mixed", "--database-url", sqlite_url)
    assert out.returncode == 2, out.stderr
    assert "items() must be a plain def" in out.stderr and "Traceback" not in out.stderr


def test_async_conflicts_are_retried_from_each_drivers_own_errors(cli, write_job, db_url):
    """A hot row read and written by every item at the default isolation:
    asyncpg's 40001, MariaDB's deadlock (1213) and SQLite's busy are retried,
    and no update is lost."""
    from jobkit import ASYNC_COUNTER

    write_job("acounter", ASYNC_COUNTER)
    out = cli(
        "run", "acounter", "--database-url", db_url, "--param", "n=150", "--workers", "4",
        "--retries", "1000", "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["succeeded"] == 150
    assert query(db_url, "SELECT n FROM counter") == [(150,)]
    if not db_url.startswith("sqlite"):
        assert summary["retried"] > 0  # SQLite's BEGIN IMMEDIATE takes turns instead


def test_max_failures_aborts_an_async_run(cli, write_job, sqlite_url):
    write_job("arecord", ASYNC_RECORD)
    bad = ",".join(str(i) for i in range(0, 400, 2))
    out = cli(
        "run", "arecord", "--database-url", sqlite_url, "--param", "n=400", "--param", f"bad={bad}",
        "--max-failures", "3", "--concurrency", "4", "--workers", "2", "--json",
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    summary = json.loads(out.stdout)
    assert summary["status"] == "aborted" and 4 <= summary["failed"] <= 12
    assert "aborted: more than 3 items failed" in out.stderr


ASYNC_SCOPED = """
\"\"\"Application code finds its session through an async_scoped_session.\"\"\"
import asyncio, os
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_scoped_session, async_sessionmaker, create_async_engine

engine = create_async_engine(os.environ["APP_URL"])
Session = async_scoped_session(async_sessionmaker(engine), scopefunc=asyncio.current_task)
SCOPED_SESSION = Session

async def record(item):  # the application's own service: it takes no session
    await Session.execute(text("INSERT INTO effects VALUES (:i)"), {"i": item})
    await Session.commit()

async def setup(ctx, session):
    assert Session() is session
    await Session.execute(text("CREATE TABLE IF NOT EXISTS effects (item INTEGER NOT NULL)"))

async def items(ctx, session):
    assert Session() is session
    for i in range(int(ctx.params.get("n", 60))):
        yield i

def item_key(item):
    return str(item)

async def process(ctx, session, item):
    assert Session() is session, "the registry hands out the item's session"
    await record(item)
    if item == 3:
        raise ValueError("fails after its service committed")
"""


def test_an_async_scoped_session_hands_application_code_the_items_session(cli, write_job, db_url):
    """The service commits through the registry, then the item fails: nothing
    of it stays; every other item once, each on its own task's session."""
    from sqlalchemy.engine import make_url

    write_job("ascoped", ASYNC_SCOPED)
    app_url = (
        make_url(db_url)
        .set(
            drivername={"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}.get(
                make_url(db_url).get_backend_name(), "mysql+aiomysql"
            )
        )
        .render_as_string(hide_password=False)
    )
    out = cli("run", "ascoped", "--database-url", db_url, "--json", env={"APP_URL": app_url})
    assert out.returncode == 1, out.stderr
    summary = json.loads(out.stdout)
    assert (summary["succeeded"], summary["failed"]) == (59, 1), out.stderr
    assert "ValueError: fails after its service committed" in summary["failures"][0]["error"]
    items = sorted(i for (i,) in query(db_url, "SELECT item FROM effects"))
    assert items == [i for i in range(60) if i != 3]


def test_an_async_job_with_a_threads_scoped_session_is_refused(cli, write_job, sqlite_url):
    write_job(
        "athreads",
        """
        from sqlalchemy import create_engine
        from sqlalchemy.orm import scoped_session, sessionmaker

        SCOPED_SESSION = scoped_session(sessionmaker(create_engine("sqlite://")))

        async def items(ctx, session):
            yield 1

        async def process(ctx, session, item):
            pass
        """,
    )
    out = cli("run", "athreads", "--database-url", sqlite_url)
    assert out.returncode == 2, out.stderr
    assert "async_scoped_session" in out.stderr and out.stderr.strip().count("\n") == 0


ASYNC_FLASK_CONTEXT = """
\"\"\"An async job whose code needs the Flask app's context (current_app, g).\"\"\"
import atexit, contextlib, json, os
from flask import Flask, current_app, g
from sqlalchemy import text

app = Flask("aflask")
app.config["PRICE"] = 7
contexts = {"entered": 0, "left": 0}

@contextlib.contextmanager
def APP_CONTEXT():
    contexts["entered"] += 1
    try:
        with app.app_context():
            yield
    finally:
        contexts["left"] += 1

atexit.register(lambda: open(f"{os.environ['CONTEXTS']}.{os.getpid()}", "w").write(json.dumps(contexts)))

async def setup(ctx, session):
    assert current_app.name == "aflask"
    await session.execute(text("CREATE TABLE IF NOT EXISTS effects (item INTEGER, price INTEGER)"))

async def items(ctx, session):
    assert current_app.name == "aflask"
    for i in range(60):
        yield i

async def prepare(ctx, item):
    g.prepared = item  # the same app context as the item's process, in the same task
    return item

async def process(ctx, session, item):
    assert g.prepared == item, "process runs in the app context its prepare ran in"
    price = current_app.config["PRICE"]
    await session.execute(text("INSERT INTO effects VALUES (:i, :p)"), {"i": item, "p": price})
"""


@pytest.mark.parametrize("extra", [[], ["--processes", "2"]], ids=["single", "distributed"])
def test_an_async_jobs_app_context_is_entered_once_per_task_and_left(cli, write_job, pg_url, tmp_path, extra):
    """APP_CONTEXT is entered once in each task that runs job code (a chunk's
    task, or a distributed run's claimer), not around each hook: what
    prepare() leaves in flask.g, process() finds; every context entered is
    left by the end of the run."""
    write_job("aflask", ASYNC_FLASK_CONTEXT)
    env = {"CONTEXTS": str(tmp_path / "c")}
    out = cli("run", "aflask", "--database-url", pg_url, "--json", *extra, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["succeeded"] == 60
    assert sorted(query(pg_url, "SELECT item, price FROM effects")) == [(i, 7) for i in range(60)]
    processes = [json.loads(path.read_text()) for path in tmp_path.glob("c.*")]  # one file per process
    assert len(processes) == (2 if extra else 1)
    assert all(contexts["entered"] == contexts["left"] > 0 for contexts in processes), processes
    # A task per chunk (a claimer per worker, distributed), setup's, and one per
    # read of items() (256 items a read, and the read that finds the end): never one per hook.
    assert sum(contexts["entered"] for contexts in processes) <= 60 + 3 * len(processes)
