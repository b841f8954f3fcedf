"""The database's bad moments: restarts, outages past the bound, a lost guard,
serializable defaults and long snapshots. The tests that restart or stop a
server use this module's own server (``own_pg``), never the shared one."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest
from helpers import (
    assert_whole_items,
    execute,
    finish,
    kill_lock_connection,
    lock_connections,
    query,
    wait_for_rows,
)
from jobkit import PAGED, TWO_ROWS
from sqlalchemy import create_engine, make_url, text

pytestmark = pytest.mark.postgres


def effects_exactly_once(url: str, n: int) -> None:
    rows = sorted(item for (item,) in query(url, "SELECT item FROM effects"))
    assert rows == list(range(n)), f"{len(rows)} effect rows, {len(set(rows))} distinct, {n} items"


def history(url: str) -> list[dict]:
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(text("SELECT * FROM jobrunner_runs ORDER BY id")).mappings()]
    engine.dispose()
    return rows


# -- restarts and outages within the bound ------------------------------------------------
@pytest.mark.parametrize("lock", [[], ["--no-lock"]], ids=["lock", "no-lock"])
def test_a_fast_restart_mid_run_fails_no_item(spawn, write_job, own_pg, own_pg_url, lock):
    write_job("paged", PAGED)
    run = spawn("run", "paged", "--database-url", own_pg_url, "--param", "n=400", "--json", *lock)
    wait_for_rows(own_pg_url, "effects", minimum=60)
    own_pg.pg_ctl("-m", "fast", "-w", "restart")
    code, out, err = finish(run)
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["succeeded"], summary["failed"]) == (400, 0)
    assert "the database is unreachable" in err and "the database is back" in err
    effects_exactly_once(own_pg_url, 400)
    [row] = history(own_pg_url)
    assert (row["status"], row["succeeded"], row["failed"]) == ("succeeded", 400, 0)


NO_KEY = """
from sqlalchemy import text

def setup(ctx, session):
    session.execute(text("CREATE TABLE IF NOT EXISTS effects (item INTEGER NOT NULL)"))

def items(ctx, session):
    return range(int(ctx.params["n"]))

def process(ctx, session, item):
    session.execute(text("INSERT INTO effects VALUES (:i)"), {"i": item})
"""


def test_commits_cut_by_restarts_are_settled_without_item_key(spawn, write_job, own_pg, own_pg_url):
    """Four workers committing back to back: a restart cuts some COMMITs, whose
    outcome only the server knows. Without item_key, PostgreSQL's transaction
    status settles them: nothing fails, nothing is done twice."""
    write_job("nokey", NO_KEY)
    run = spawn("run", "nokey", "--database-url", own_pg_url, "-w", "4", "--param", "n=12000", "--json")
    wait_for_rows(own_pg_url, "effects", minimum=500)
    for _ in range(2):
        own_pg.pg_ctl("-m", "fast", "-w", "restart")
        time.sleep(1)
    code, out, err = finish(run)
    assert code == 0, err
    assert json.loads(out)["failed"] == 0
    assert err.count("the database is back") >= 2, err
    effects_exactly_once(own_pg_url, 12000)


@pytest.mark.parametrize("case", ["no item_key", "item_key"])
def test_only_a_run_settled_by_transaction_id_asks_for_the_id_at_begin(
    cli, write_job, pg_url, pg_server_log, case
):
    """The id costs a statement in every item's BEGIN (BENCHMARKS.md, section
    16). Resume keys settle a commit cut by a restart without it: such a run
    begins without it. (A dry run is one transaction of psycopg2's own.)"""
    if pg_server_log is None:
        pytest.skip("the server's log is not ours to read")
    key = "\ndef item_key(item):\n    return str(item)\n" if case == "item_key" else ""
    write_job("nokey", NO_KEY + key)
    execute(pg_url, f"ALTER DATABASE {make_url(pg_url).database} SET log_statement = 'all'")
    log_from = pg_server_log.stat().st_size
    out = cli("run", "nokey", "--database-url", pg_url, "-w", "2", "--param", "n=30", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["succeeded"] == 30
    with pg_server_log.open(errors="replace") as log:
        log.seek(log_from)
        statements = [line.split("statement: ", 1)[1].strip() for line in log if "statement: " in line]
    begins = [s for s in statements if s.startswith("BEGIN ISOLATION LEVEL REPEATABLE READ")]
    asking = [s for s in begins if "txid_current()" in s]
    assert len(begins) >= 30, [s for s in statements if "BEGIN" in s]
    if case == "no item_key":
        assert len(asking) == len(begins), begins
    else:
        assert asking == [], asking


def test_an_immediate_stop_with_the_server_back_after_seconds(spawn, write_job, own_pg, own_pg_url):
    write_job("paged", PAGED)
    run = spawn("run", "paged", "--database-url", own_pg_url, "--param", "n=300", "--json")
    wait_for_rows(own_pg_url, "effects", minimum=60)
    own_pg.pg_ctl("-m", "immediate", "-w", "stop")
    time.sleep(3)
    own_pg.start_again()
    code, out, err = finish(run)
    assert code == 0, err
    assert json.loads(out)["failed"] == 0
    assert "lock taken again" in err
    effects_exactly_once(own_pg_url, 300)


def test_items_streamed_from_one_cursor_end_with_69_when_the_server_restarts(
    spawn, write_job, own_pg, own_pg_url
):
    """A server-side cursor cannot survive a restart: that is the database going
    away (69), not the job failing (1). paged() survives it (the tests above)."""
    write_job("paged", PAGED)
    run = spawn("run", "paged", "--database-url", own_pg_url, "--param", "n=400", "--param", "source=stream")
    wait_for_rows(own_pg_url, "effects", minimum=40)
    own_pg.pg_ctl("-m", "fast", "-w", "restart")
    code, _, err = finish(run)
    assert code == 69, err
    assert "the database went away while items() ran" in err


# -- past the bound ---------------------------------------------------------------------------
def test_an_outage_past_the_bound_stops_with_69_and_history_says_so(
    cli, spawn, write_job, own_pg, own_pg_url
):
    write_job("paged", PAGED)
    run = spawn(
        "run", "paged", "--database-url", own_pg_url, "--param", "n=3000", "--outage-timeout", "2", "--json"
    )
    wait_for_rows(own_pg_url, "effects", minimum=5)
    time.sleep(6)  # past the first checkpoint (every 5 s)
    own_pg.pg_ctl("-m", "fast", "-w", "stop")
    t0 = time.monotonic()
    code, out, err = finish(run)
    assert code == 69, err
    assert time.monotonic() - t0 < 15
    summary = json.loads(out)
    assert summary["status"] == "unavailable" and "--outage-timeout 2s" in summary["error"]
    assert "cannot record the end of this run" in err
    own_pg.start_again()
    committed = query(own_pg_url, "SELECT count(*) FROM effects")[0][0]
    assert committed == summary["succeeded"]

    # The next run finds the row still 'running', and says what it knows.
    assert cli("run", "paged", "--database-url", own_pg_url, "--resume").returncode == 0
    first = history(own_pg_url)[0]
    assert first["status"] == "crashed" and "its end was never recorded" in first["error"]
    assert 0 < first["succeeded"] <= committed
    assert committed - first["succeeded"] <= 5 * 2 * 4 / 0.01, "counts older than one checkpoint"
    effects_exactly_once(own_pg_url, 3000)


# -- the fence ------------------------------------------------------------------------------
def test_items_in_flight_when_the_lock_is_lost_never_commit(spawn, write_job, pg_url):
    """Each item takes 2 s, ten heartbeats. The guard's connection is killed while
    items are in flight: the guard takes the lock again (no other run started), and
    every item that was in flight is redone; none of them commits its first attempt."""
    write_job("two_rows", TWO_ROWS)
    run = spawn(
        "run",
        "two_rows",
        "--database-url",
        pg_url,
        "--param",
        "n=12",
        "--param",
        "sleep=2",
        "--heartbeat",
        "0.2",
        "--json",
    )
    wait_for_rows(pg_url, "jobrunner_runs")
    time.sleep(1.0)  # the first four items are half-way through
    [(since,)] = query(pg_url, "SELECT since FROM jobrunner_lock_holders WHERE job = 'two_rows'")
    killed_at = time.time()
    killed = kill_lock_connection(pg_url, "two_rows")
    assert killed == [(True,)]
    # Once the lock is taken again (a new lock connection), and while the run
    # still holds it: status and the 'already running' line say when the run
    # took the lock, not when it took it again. (A run that ends takes its row.)
    deadline = time.monotonic() + 20
    while lock_connections(pg_url, "two_rows") != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the holder row is written just after the lock is taken
    assert run.poll() is None, "the run ended before its lock was seen taken again"
    assert query(pg_url, "SELECT since FROM jobrunner_lock_holders WHERE job = 'two_rows'") == [(since,)]
    code, _, err = finish(run, timeout=60)
    assert code == 0, err
    assert "lock in doubt" in err and "lock taken again" in err
    assert query(pg_url, "SELECT since FROM jobrunner_lock_holders WHERE job = 'two_rows'") == []
    stale = query(pg_url, f"SELECT item, t0, t1 FROM pairs WHERE part = 2 AND t0 < {killed_at}")
    assert stale == [], f"items begun before the loss committed after it: {stale}"
    assert_whole_items(pg_url)
    assert sorted(i for (i,) in query(pg_url, "SELECT item FROM pairs WHERE part = 2")) == list(range(12))


def test_a_frozen_run_whose_lock_was_taken_meanwhile_commits_nothing(cli, spawn, write_job, pg_url):
    """Run A is frozen (SIGSTOP) with items in flight; its guard's connection dies;
    run B takes the lock, marks A crashed and finishes the job with --resume. When A
    wakes up, its workers must not commit on stale knowledge: A exits 69, and every
    item is done exactly once."""
    write_job("paged", PAGED)
    a = spawn(
        "run",
        "paged",
        "--database-url",
        pg_url,
        "--param",
        "n=200",
        "--param",
        "sleep=0.3",
        "--heartbeat",
        "0.2",
        "--json",
    )
    wait_for_rows(pg_url, "effects", minimum=8)
    a.send_signal(signal.SIGSTOP)
    try:
        kill_lock_connection(pg_url, "paged")
        b = cli("run", "paged", "--database-url", pg_url, "--param", "sleep=0", "--resume", "--json")
        assert b.returncode == 0, b.stderr
        assert "marked 1 earlier run(s) of paged as crashed" in b.stderr
    finally:
        a.send_signal(signal.SIGCONT)
    code, _, err = finish(a, timeout=60)
    assert code == 69, err
    assert "another run of paged started while it was lost" in err
    effects_exactly_once(pg_url, 200)


# -- serializable defaults and snapshots -----------------------------------------------------
@pytest.mark.parametrize("mode", ["row", "advisory"])
def test_the_guard_stays_out_of_serialization_under_a_serializable_default(
    spawn, write_job, pg_url, tmp_path, mode
):
    database = pg_url.rsplit("/", 1)[1]
    execute(pg_url, f"ALTER DATABASE {database} SET default_transaction_isolation = 'serializable'")
    execute(pg_url, "CREATE TABLE other (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
    execute(pg_url, "INSERT INTO other SELECT g, 0 FROM generate_series(1, 50) g")
    (tmp_path / "jobrunner.toml").write_text(f'[jobs.two_rows]\nlock = "{mode}"\n')
    write_job("two_rows", TWO_ROWS)
    run = spawn("run", "two_rows", "--database-url", pg_url, "--param", "n=40", "--param", "sleep=0.1")
    wait_for_rows(pg_url, "pairs", minimum=4)

    # Another application's serializable transactions, while the run holds its lock.
    errors: list[str] = []
    engine = create_engine(pg_url)

    def client() -> None:
        for i in range(40):
            try:
                with engine.begin() as conn:
                    conn.execute(text("SELECT sum(n) FROM other"))
                    conn.execute(text("UPDATE other SET n = n + 1 WHERE id = :i"), {"i": i % 50 + 1})
            except Exception as error:
                errors.append(str(error).splitlines()[0])

    clients = [threading.Thread(target=client) for _ in range(3)]
    for thread in clients:
        thread.start()
    guard = query(
        pg_url,
        "SELECT a.pid, a.backend_xmin::text, a.backend_xid::text, "
        " (SELECT count(*) FROM pg_locks l WHERE l.pid = a.pid AND l.mode = 'SIReadLock') "
        "FROM pg_stat_activity a WHERE application_name = 'jobrunner two_rows lock' "
        f"AND datname = '{database}'",
    )
    for thread in clients:
        thread.join()
    engine.dispose()
    assert finish(run)[0] == 0
    [(_, xmin, xid, predicate_locks)] = guard
    assert xmin is None, "the guard holds a snapshot"
    assert predicate_locks == 0, "the guard takes part in serialization"
    if mode == "advisory":
        assert xid is None, "the advisory guard holds a transaction id"
    assert not [e for e in errors if "RWConflictPool" in e or "53200" in e], errors


def vacuum_report(url: str, table: str) -> tuple[int | None, int | None]:
    import re

    engine = create_engine(url)
    raw = engine.raw_connection()
    try:
        raw.dbapi_connection.autocommit = True
        cursor = raw.cursor()
        cursor.execute(f"UPDATE {table} SET n = n + 1")
        # Item transactions that began before the UPDATE may hold its dead rows
        # for the few milliseconds they last; only a long snapshot holds them longer.
        time.sleep(1.0)
        cursor.execute(f"VACUUM (VERBOSE) {table}")
        notices = " ".join(raw.dbapi_connection.notices)
    finally:
        raw.close()
        engine.dispose()
    removed = re.search(r"tuples: (\d+) removed", notices)
    kept = re.search(r"(\d+) are dead but not yet removable", notices)
    return (int(removed.group(1)) if removed else None, int(kept.group(1)) if kept else None)


@pytest.mark.parametrize(("source", "pinned"), [("paged", False), ("stream", True)])
def test_vacuum_during_a_long_run_depends_on_how_items_are_read(
    spawn, write_job, pg_url, tmp_path, source, pinned
):
    execute(pg_url, "CREATE TABLE churn (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
    execute(pg_url, "INSERT INTO churn SELECT g, 0 FROM generate_series(1, 1000) g")
    (tmp_path / "jobrunner.toml").write_text('[jobs.paged]\nlock = "advisory"\n')
    write_job("paged", PAGED)
    run = spawn(
        "run",
        "paged",
        "--database-url",
        pg_url,
        "--param",
        "n=2000",
        "--param",
        "sleep=0.005",
        "--param",
        f"source={source}",
        "-w",
        "2",
    )
    wait_for_rows(pg_url, "effects", minimum=100)
    removed, kept = vacuum_report(pg_url, "churn")
    run.send_signal(signal.SIGTERM)
    finish(run)
    if pinned:
        assert kept == 1000, f"a streaming cursor should pin the snapshot: removed {removed}, kept {kept}"
    else:
        assert (removed, kept) == (1000, 0), f"paged() pinned a snapshot: removed {removed}, kept {kept}"


def test_an_outage_past_the_bound_ends_a_distributed_run_with_69_and_one_line(
    spawn, write_job, own_pg, own_pg_url
):
    """Seen under cron: exit 70 and a 129-line traceback from the feeder's own
    statements, no end line, and history that could only say crashed."""
    write_job("paged", PAGED)
    run = spawn(
        "run",
        "paged",
        "--database-url",
        own_pg_url,
        "--join",
        "--param",
        "n=20000",
        "--outage-timeout",
        "2",
        "--max-failures",
        "100",
        "--json",
    )
    wait_for_rows(own_pg_url, "effects", minimum=50)
    own_pg.pg_ctl("-m", "fast", "-w", "stop")
    t0 = time.monotonic()
    code, out, err = finish(run)
    assert code == 69, err
    assert time.monotonic() - t0 < 20
    assert "Traceback" not in err and "internal error" not in err, err
    summary = json.loads(out)
    assert summary["status"] == "unavailable" and "--outage-timeout 2s" in summary["error"], summary
    assert summary["exit_code"] == 69
    assert any(line.split(" ", 1)[-1].startswith("paged: unavailable: ") for line in err.splitlines()), err
