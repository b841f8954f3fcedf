"""Run history, crash detection and --resume, end to end."""

from __future__ import annotations

import json
import signal
from datetime import date, timedelta

import pytest
from helpers import execute, finish, query, wait_for_rows
from jobkit import RESUMABLE


def effects_exactly_once(url: str, n: int) -> None:
    rows = sorted(item for (item,) in query(url, "SELECT item FROM effects"))
    assert rows == list(range(n)), f"effects not exactly once: {len(rows)} rows"


def run_json(cli, *args):
    out = cli(*args, "--json")
    return out, json.loads(out.stdout)


def test_resume_after_failures_commits_each_item_once(cli, write_job, db_url):
    write_job("resumable", RESUMABLE)
    first, summary = run_json(
        cli, "run", "resumable", "--database-url", db_url, "--param", "n=50", "--param", "broken=3,17,40"
    )
    assert first.returncode == 1 and summary["failed"] == 3 and summary["succeeded"] == 47
    execute(db_url, "DELETE FROM broken")  # the cause is fixed
    second, summary = run_json(
        cli, "run", "resumable", "--database-url", db_url, "--param", "n=50", "--resume"
    )
    assert second.returncode == 0, second.stderr
    assert (summary["succeeded"], summary["skipped"], summary["failed"]) == (3, 47, 0)
    assert summary["resumed_from"] == summary["run_id"] - 1
    assert "resuming run" in second.stderr
    effects_exactly_once(db_url, 50)


def test_resume_follows_the_chain_of_resumed_runs(cli, write_job, db_url):
    write_job("resumable", RESUMABLE)
    cli("run", "resumable", "--database-url", db_url, "--param", "n=30", "--param", "broken=1,2")
    execute(db_url, "DELETE FROM broken WHERE item = 1")
    _, second = run_json(cli, "run", "resumable", "--database-url", db_url, "--param", "n=30", "--resume")
    assert (second["succeeded"], second["failed"], second["skipped"]) == (1, 1, 28)
    execute(db_url, "DELETE FROM broken")
    _, third = run_json(cli, "run", "resumable", "--database-url", db_url, "--param", "n=30", "--resume")
    assert (third["succeeded"], third["failed"], third["skipped"]) == (1, 0, 29)
    effects_exactly_once(db_url, 30)


def test_resume_after_sigkill_marks_crashed_and_skips_committed(cli, spawn, write_job, db_url):
    write_job("resumable", RESUMABLE)
    victim = spawn("run", "resumable", "--database-url", db_url, "--param", "n=200", "--param", "sleep=0.05")
    wait_for_rows(db_url, "effects", minimum=20)
    victim.send_signal(signal.SIGKILL)
    finish(victim)
    [(committed,)] = query(db_url, "SELECT count(*) FROM effects")
    assert 0 < committed < 200
    out, summary = run_json(
        cli,
        "run",
        "resumable",
        "--database-url",
        db_url,
        "--param",
        "n=200",
        "--param",
        "sleep=0",
        "--resume",
    )
    assert out.returncode == 0, out.stderr
    assert summary["skipped"] == committed and summary["succeeded"] == 200 - committed
    assert "marked 1 earlier run(s) of resumable as crashed" in out.stderr
    effects_exactly_once(db_url, 200)

    listing = json.loads(cli("history", "resumable", "--database-url", db_url, "--json").stdout)
    assert [r["status"] for r in listing] == ["succeeded", "crashed"]
    assert listing[1]["finished_at"] is None and listing[0]["skipped"] == committed
    for key in ("job", "status", "dry_run", "started_at", "finished_at", "succeeded", "failed"):
        assert key in listing[0]
    human = cli("history", "--database-url", db_url).stdout.splitlines()
    assert human[0].split()[:3] == ["id", "job", "status"]
    assert "succeeded" in human[1] and "crashed" in human[2]


def test_resume_with_nothing_to_resume_runs_normally(cli, write_job, db_url):
    write_job("resumable", RESUMABLE)
    assert cli("run", "resumable", "--database-url", db_url, "--param", "n=5").returncode == 0
    out, summary = run_json(cli, "run", "resumable", "--database-url", db_url, "--param", "n=5", "--resume")
    assert out.returncode == 0 and summary["skipped"] == 0 and summary["succeeded"] == 5
    assert "nothing to resume" in out.stderr


def test_dry_runs_are_recorded_but_resume_looks_past_them(cli, write_job, db_url):
    write_job("resumable", RESUMABLE)
    assert (
        cli("run", "resumable", "--database-url", db_url, "--param", "n=5", "--param", "broken=1").returncode
        == 1
    )
    execute(db_url, "DELETE FROM broken")
    dry = cli("run", "resumable", "--database-url", db_url, "--param", "n=5", "--dry-run", "--workers", "4")
    assert dry.returncode == 0
    listing = json.loads(cli("history", "--database-url", db_url, "--json").stdout)
    assert [(r["status"], r["dry_run"]) for r in listing] == [("succeeded", True), ("failed", False)]
    assert listing[0]["workers"] == 1, "a dry run runs in one thread, whatever --workers says"
    out, summary = run_json(cli, "run", "resumable", "--database-url", db_url, "--param", "n=5", "--resume")
    assert out.returncode == 0, out.stderr
    assert (summary["skipped"], summary["succeeded"]) == (4, 1)
    assert summary["resumed_from"] == listing[1]["id"]
    effects_exactly_once(db_url, 5)


def test_history_limit_and_purge(cli, write_job, db_url):
    write_job("resumable", RESUMABLE)
    for _ in range(3):
        cli("run", "resumable", "--database-url", db_url, "--param", "n=2", "--no-lock")
    assert len(json.loads(cli("history", "--database-url", db_url, "--json", "--limit", "2").stdout)) == 2
    tomorrow = (date.today() + timedelta(days=2)).isoformat()
    out = cli("history", "--database-url", db_url, "--purge-before", tomorrow)
    assert out.returncode == 0 and out.stdout.strip() == "deleted 3 runs and 6 item keys"
    assert json.loads(cli("history", "--database-url", db_url, "--json").stdout) == []
    assert cli("history", "--database-url", db_url, "--purge-before", "yesterday").returncode == 2


DEFERRED = '''
"""Each item writes an effect whose reference is checked only at COMMIT."""
from sqlalchemy import text

BATCH_SIZE = 10

def setup(ctx, session):
    session.execute(text("CREATE TABLE IF NOT EXISTS refs (id INTEGER PRIMARY KEY)"))
    session.execute(text(
        "CREATE TABLE IF NOT EXISTS effects (item INTEGER NOT NULL, "
        "ref INTEGER REFERENCES refs (id) DEFERRABLE INITIALLY DEFERRED)"))

def items(ctx, session):
    return range(30)

def process(ctx, session, item):
    ref = -1 if item == 13 else 0  # item 13's reference is missing until the test adds it
    session.execute(text("INSERT INTO effects VALUES (:i, :r)"), {"i": item, "r": ref})

def item_key(item):
    return str(item)
'''


@pytest.mark.postgres
def test_keys_of_a_chunk_rolled_back_at_commit_are_not_kept_and_resume_does_each_item_once(
    cli, write_job, pg_url
):
    """Resume keys written in a transaction of their own would outlive a chunk
    that COMMIT itself refused, and --resume would skip items never done."""
    write_job("deferred", DEFERRED)
    execute(pg_url, "CREATE TABLE refs (id INTEGER PRIMARY KEY)")
    execute(pg_url, "INSERT INTO refs VALUES (0)")
    first, summary = run_json(cli, "run", "deferred", "--database-url", pg_url)
    assert first.returncode == 1, first.stderr
    assert (summary["succeeded"], summary["failed"]) == (29, 1)
    [(keys,)] = query(pg_url, "SELECT count(*) FROM jobrunner_item_keys")
    assert keys == 29, "keys of the refused chunk were kept"
    execute(pg_url, "INSERT INTO refs VALUES (-1)")
    again, summary = run_json(cli, "run", "deferred", "--database-url", pg_url, "--resume")
    assert again.returncode == 0, again.stderr
    assert (summary["skipped"], summary["succeeded"]) == (29, 1)
    items = sorted(item for (item,) in query(pg_url, "SELECT item FROM effects"))
    assert items == list(range(30)), "an effect is missing or doubled"


def test_a_run_that_died_is_marked_crashed_with_what_it_committed_and_metrics_count_it(
    cli, spawn, write_job, db_url, tmp_path
):
    """History showed the last checkpoint's counts, and no metric ever counted
    the items of a run that died."""
    write_job("resumable", RESUMABLE)
    args = ("run", "resumable", "--database-url", db_url, "--metrics-file", "m.prom")
    victim = spawn(*args, "--param", "n=100000", "--param", "sleep=0.002")
    wait_for_rows(db_url, "effects", minimum=200)
    victim.send_signal(signal.SIGKILL)
    finish(victim)
    [(committed,)] = query(db_url, "SELECT count(*) FROM effects")
    out = cli(*args, "--param", "n=10")
    assert out.returncode == 0, out.stderr
    [first] = [
        r for r in json.loads(cli("history", "--database-url", db_url, "--json").stdout) if r["id"] == 1
    ]
    assert first["status"] == "crashed" and "counts what it committed" in first["error"]
    assert first["succeeded"] == committed, (first["succeeded"], committed)
    text = (tmp_path / "m.prom").read_text()
    assert f'jobrunner_items_total{{job="resumable",outcome="succeeded"}} {committed + 10}' in text, text


def test_history_of_a_database_an_older_jobrunner_used_gains_the_newer_tables(cli, write_job, sqlite_url):
    """A database whose tables came from an older jobrunner, without a table
    added since (here jobrunner_chunk_commits): history still shows its runs,
    and the table is added, as a run would add it."""
    write_job("resumable", RESUMABLE)
    assert cli("run", "resumable", "--database-url", sqlite_url, "--param", "n=2").returncode == 0
    execute(sqlite_url, "DROP TABLE jobrunner_chunk_commits")
    [run] = json.loads(cli("history", "--database-url", sqlite_url, "--json").stdout)
    assert (run["job"], run["succeeded"]) == ("resumable", 2)
    names = query(sqlite_url, "SELECT name FROM sqlite_master WHERE name = 'jobrunner_chunk_commits'")
    assert names == [("jobrunner_chunk_commits",)]
