"""Dry-run, retries, failure limits and graceful shutdown, end to end."""

from __future__ import annotations

import json
import signal
import time

import pytest
from helpers import assert_whole_items, finish, query, wait_for_rows
from jobkit import DRY, RECORD, RETRY, TWO_ROWS
from sqlalchemy import create_engine, text


def snapshot(url: str) -> dict[str, list[tuple]]:
    """Every row of every table but jobrunner's own, sorted."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            from sqlalchemy import inspect

            names = [n for n in inspect(conn).get_table_names() if not n.startswith("jobrunner_")]
            return {n: sorted(map(tuple, conn.execute(text(f"SELECT * FROM {n}")))) for n in names}
    finally:
        engine.dispose()


# -- dry-run -------------------------------------------------------------------------------
def test_dry_run_counts_orm_and_core_changes(cli, write_job, db_url):
    write_job("dry", DRY)
    # setup commits in a real run; with --param nothing, so only setup's work remains
    prepare = cli("run", "dry", "--database-url", db_url, "--dry-run", "--json")
    assert prepare.returncode == 1, prepare.stderr
    before = snapshot(db_url)
    assert before == {}, "the dry run's setup must roll back too"

    write_job("dry_setup", DRY.replace("return range(10)", "return []"))
    assert cli("run", "dry_setup", "--database-url", db_url).returncode == 0
    before = snapshot(db_url)
    assert len(before["dry_a"]) == 10 and len(before["dry_b"]) == 10

    out = cli("run", "dry", "--database-url", db_url, "--dry-run", "--json")
    assert out.returncode == 1, out.stderr
    assert snapshot(db_url) == before
    changes = json.loads(out.stdout)["changes"]
    # items 0-8 succeed (9 fails, and its changes are not counted):
    # dry_a: 9 ORM inserts, 9 ORM updates (items 0 and 1 then delete their row)
    # dry_b: 9 Core + 9 text() inserts, 9 updates, 3 deletes
    assert changes == {
        "dry_a": {"insert": 9, "update": 9, "delete": 2},
        "dry_b": {"insert": 18, "update": 9, "delete": 3},
    }


def test_dry_run_summary_on_the_terminal_lists_changes(cli, write_job, sqlite_url):
    write_job("dry_setup", DRY.replace("return range(10)", "return []"))
    write_job("dry", DRY)
    assert cli("run", "dry_setup", "--database-url", sqlite_url).returncode == 0
    out = cli("run", "dry", "--database-url", sqlite_url, "--dry-run")
    assert "would change dry_a: 9 insert, 9 update, 2 delete" in out.stdout
    assert "(dry run)" in out.stdout


def test_dry_run_takes_the_lock(spawn, write_job, db_url):
    write_job("two_rows", TWO_ROWS)
    # One worker: about 4 s, so a loser that takes seconds to start on a busy machine still meets it.
    holder = spawn(
        "run", "two_rows", "--database-url", db_url, "-w", "1", "--param", "n=40", "--param", "sleep=0.1"
    )
    wait_for_rows(db_url, "pairs")
    code, _, err = finish(spawn("run", "two_rows", "--database-url", db_url, "--dry-run"))
    assert code == 75, err
    assert finish(holder)[0] == 0


# -- retries ---------------------------------------------------------------------------------
@pytest.mark.postgres
@pytest.mark.parametrize("mode", ["terminate", "40P01", "40001"])
def test_transient_errors_are_retried(cli, write_job, pg_url, tmp_path, mode):
    write_job("retry", RETRY)
    log = tmp_path / "attempts.log"
    out = cli(
        "run",
        "retry",
        "--database-url",
        pg_url,
        "--param",
        f"mode={mode}",
        "--param",
        f"log={log}",
        "--param",
        "n=20",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert (summary["succeeded"], summary["failed"], summary["retried"]) == (20, 0, 20)
    assert sorted(item for (item,) in query(pg_url, "SELECT item FROM done")) == list(range(20))
    attempts = log.read_text().split()
    assert sorted(map(int, attempts)) == sorted(list(range(20)) * 2)


def test_other_errors_are_attempted_once(cli, write_job, db_url, tmp_path):
    write_job("retry", RETRY)
    log = tmp_path / "attempts.log"
    out = cli(
        "run",
        "retry",
        "--database-url",
        db_url,
        "--param",
        "mode=value",
        "--param",
        f"log={log}",
        "--param",
        "n=5",
        "--json",
    )
    assert out.returncode == 1
    summary = json.loads(out.stdout)
    assert (summary["succeeded"], summary["failed"], summary["retried"]) == (0, 5, 0)
    assert sorted(map(int, log.read_text().split())) == list(range(5))
    assert query(db_url, "SELECT count(*) FROM done") == [(0,)]


@pytest.mark.postgres
def test_retries_zero_fails_transient_errors_at_once(cli, write_job, pg_url, tmp_path):
    write_job("retry", RETRY)
    out = cli(
        "run",
        "retry",
        "--database-url",
        pg_url,
        "--param",
        "mode=40001",
        "--param",
        f"log={tmp_path / 'log'}",
        "--param",
        "n=3",
        "--retries",
        "0",
        "--json",
    )
    assert out.returncode == 1
    summary = json.loads(out.stdout)
    assert summary["failed"] == 3 and summary["retried"] == 0
    assert "SerializationFailure" in summary["failures"][0]["error"]


# -- failure limits --------------------------------------------------------------------------
def test_max_failures_aborts_the_run(cli, write_job, db_url):
    write_job("record", RECORD)
    out = cli(
        "run",
        "record",
        "--database-url",
        db_url,
        "--param",
        "n=1000",
        "--param",
        "fail=all",
        "--max-failures",
        "3",
        "--workers",
        "2",
        "--json",
    )
    assert out.returncode == 1
    summary = json.loads(out.stdout)
    assert summary["status"] == "aborted"
    assert 4 <= summary["failed"] < 1000 and summary["failed"] <= 4 + 2 * 2 + 1
    assert "aborted: more than 3 items failed" in out.stderr


# -- graceful shutdown -----------------------------------------------------------------------
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_finishes_in_flight_items_and_releases_the_lock(spawn, cli, write_job, db_url, signum, code):
    write_job("two_rows", TWO_ROWS)
    proc = spawn(
        "run", "two_rows", "--database-url", db_url, "--param", "n=400", "--param", "sleep=0.1", "--json"
    )
    wait_for_rows(db_url, "pairs", minimum=6)
    proc.send_signal(signum)
    rc, out, err = finish(proc, timeout=30)
    assert rc == code, err
    summary = json.loads(out)
    assert summary["status"] == "interrupted" and 0 < summary["succeeded"] < 400
    assert_whole_items(db_url)
    [(done,)] = query(db_url, "SELECT count(*) FROM pairs WHERE part = 2")
    assert done == summary["succeeded"]
    again = cli("run", "two_rows", "--database-url", db_url, "--param", "n=2", "--param", "sleep=0")
    assert again.returncode == 0, again.stderr


def test_second_sigint_exits_at_once(spawn, write_job, db_url):
    write_job("two_rows", TWO_ROWS)
    proc = spawn(
        "run",
        "two_rows",
        "--database-url",
        db_url,
        "--param",
        "n=40",
        "--param",
        "sleep=20",
        "--workers",
        "2",
    )
    wait_for_rows(db_url, "jobrunner_runs")  # committed just before the first items start
    time.sleep(0.5)  # two items are in flight, each for 20 s
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rc, _, _ = finish(proc, timeout=30)
    assert rc == 130
    assert time.monotonic() - t0 < 3
    assert_whole_items(db_url)
    assert query(db_url, "SELECT count(*) FROM pairs") == [(0,)], "an in-flight item was committed"
    if not db_url.startswith("sqlite"):
        # (On SQLite the items in flight hold the write lock until the process
        # is gone: the record cannot be written within the second.)
        [(status, rolled_back)] = query(db_url, "SELECT status, rolled_back FROM jobrunner_runs")
        assert (status, rolled_back) == ("interrupted", 2), "the history row was left 'running'"


def test_shutdown_timeout_rolls_back_slow_items(spawn, write_job, db_url):
    write_job("two_rows", TWO_ROWS)
    proc = spawn(
        "run",
        "two_rows",
        "--database-url",
        db_url,
        "--param",
        "n=40",
        "--param",
        "sleep=30",
        "--workers",
        "2",
        "--shutdown-timeout",
        "1",
        "--json",
    )
    time.sleep(3)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc, out, err = finish(proc, timeout=30)
    assert rc == 143, err
    assert time.monotonic() - t0 < 10
    summary = json.loads(out)
    assert summary["status"] == "interrupted"
    assert summary["rolled_back"] == 2, "the items abandoned at the timeout vanished from the counts"
    assert "rolled back" in err
    assert query(db_url, "SELECT count(*) FROM pairs") == [(0,)]
    if not db_url.startswith("sqlite"):
        # (On SQLite the abandoned items hold the one write lock until the
        # process exits: the history row cannot be written, and the next run
        # marks it crashed.)
        [(rolled_back,)] = query(db_url, "SELECT rolled_back FROM jobrunner_runs")
        assert rolled_back == 2, "history lost the abandoned items"


UPSERT = '''
"""Upserts over a populated table, with a trigger that audits updates."""
from sqlalchemy import text

def setup(ctx, session):
    session.execute(text("CREATE TABLE IF NOT EXISTS kv (k INTEGER PRIMARY KEY, v INTEGER NOT NULL)"))
    session.execute(text("CREATE TABLE IF NOT EXISTS kv_audit (k INTEGER NOT NULL)"))
    session.execute(text(
        "CREATE OR REPLACE FUNCTION kv_audit() RETURNS trigger AS $$ BEGIN "
        "INSERT INTO kv_audit VALUES (NEW.k); RETURN NEW; END $$ LANGUAGE plpgsql"))
    session.execute(text("DROP TRIGGER IF EXISTS kv_audit ON kv"))
    session.execute(text(
        "CREATE TRIGGER kv_audit AFTER UPDATE ON kv FOR EACH ROW EXECUTE FUNCTION kv_audit()"))

def items(ctx, session):
    return range(600)

def process(ctx, session, item):
    upsert = "INSERT INTO kv VALUES (:k, 1) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v"
    session.execute(text(upsert), {"k": item})
    if item == 555:
        raise ValueError("item 555 is bad")
'''


@pytest.mark.postgres
def test_a_dry_runs_report_matches_what_the_real_run_then_does(cli, write_job, pg_url):
    """Statements were classified by their first words: 500 upserts that would
    update were reported as inserts, and the trigger's rows were missed."""
    from helpers import execute

    write_job("upsert", UPSERT)
    execute(pg_url, "CREATE TABLE kv (k INTEGER PRIMARY KEY, v INTEGER NOT NULL)")
    execute(pg_url, "INSERT INTO kv SELECT g, 0 FROM generate_series(0, 499) g")
    out = cli("run", "upsert", "--database-url", pg_url, "--dry-run", "-b", "10", "--json")
    assert out.returncode == 1, out.stderr
    changes = json.loads(out.stdout)["changes"]
    # 500 updates, 99 inserts (item 555's insert is undone with it), 500 audit rows
    assert changes == {
        "kv": {"insert": 99, "update": 500, "delete": 0},
        "kv_audit": {"insert": 500, "update": 0, "delete": 0},
    }
    assert query(pg_url, "SELECT count(*), sum(v) FROM kv") == [(500, 0)], "the dry run changed the table"
    real = cli("run", "upsert", "--database-url", pg_url, "-b", "10", "--json")
    assert real.returncode == 1, real.stderr
    [(rows, ones)] = query(pg_url, "SELECT count(*), sum(v) FROM kv")
    assert (rows - 500, ones - 99) == (99, 500), "the real run did not do what the dry run said"
    assert query(pg_url, "SELECT count(*) FROM kv_audit") == [(500,)]
