"""The core run contract, end to end: ``jobrunner run`` as a subprocess, on a
real SQLite file and a real PostgreSQL database."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from helpers import query
from jobkit import COUNTER, LAZY, RECORD

REPO = Path(__file__).parent.parent


def run_json(cli, *args: str):
    out = cli(*args, "--json")
    lines = out.stdout.splitlines()
    assert len(lines) == 1, f"stdout must hold exactly one JSON object: {out.stdout!r} {out.stderr}"
    return out, json.loads(lines[0])


def test_500_items_4_workers_each_once_one_session_per_thread(cli, write_job, db_url):
    write_job("record", RECORD)
    out, summary = run_json(
        cli,
        "run",
        "record",
        "--workers",
        "4",
        "--database-url",
        db_url,
        "--param",
        "n=500",
        "--param",
        "fail=7,123",
    )
    assert out.returncode == 1, out.stderr
    assert summary["status"] == "failed"
    assert (summary["succeeded"], summary["failed"], summary["retried"], summary["skipped"]) == (498, 2, 0, 0)
    assert summary["dry_run"] is False and summary["job"] == "record"
    assert isinstance(summary["duration_seconds"], float)
    assert sorted(summary["failures"], key=lambda f: int(f["item"])) == [
        {"item": "7", "error": "ValueError: item 7 is broken"},
        {"item": "123", "error": "ValueError: item 123 is broken"},
    ]

    rows = query(db_url, "SELECT item, thread, session_id FROM seen")
    items = [r[0] for r in rows]
    assert sorted(items) == sorted(set(range(500)) - {7, 123}), "each item exactly once; failures rolled back"
    sessions_by_thread: dict[int, set[int]] = {}
    threads_by_session: dict[int, set[int]] = {}
    for _, thread, session in rows:
        sessions_by_thread.setdefault(thread, set()).add(session)
        threads_by_session.setdefault(session, set()).add(thread)
    assert 1 <= len(sessions_by_thread) <= 4
    assert all(len(s) == 1 for s in sessions_by_thread.values()), "a thread used two sessions"
    assert all(len(t) == 1 for t in threads_by_session.values()), "a session was seen in two threads"
    # failures go to stderr as one line each, no traceback without --debug
    assert "item 7 failed: ValueError: item 7 is broken" in out.stderr
    assert "Traceback" not in out.stderr


def test_all_items_succeed_exit_0(cli, write_job, db_url):
    write_job("record", RECORD)
    out, summary = run_json(cli, "run", "record", "--database-url", db_url, "--param", "n=50")
    assert out.returncode == 0, out.stderr
    assert summary["status"] == "succeeded" and summary["succeeded"] == 50 and summary["failures"] == []
    assert query(db_url, "SELECT count(*) FROM seen") == [(50,)]


def test_debug_shows_tracebacks_of_failures(cli, write_job, sqlite_url):
    write_job("record", RECORD)
    out = cli("run", "record", "--database-url", sqlite_url, "--param", "n=3", "--param", "fail=1", "--debug")
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "ValueError: item 1 is broken" in out.stderr


def test_items_are_consumed_lazily(cli, write_job, db_url):
    """A generator of 1,000,000 items: the first is processed before 10,000 are
    produced. Every item after the first fails, so --max-failures 0 ends the
    run early and the test stays fast."""
    write_job("lazy", LAZY)
    out = cli(
        "run",
        "lazy",
        "--database-url",
        db_url,
        "--param",
        "n=1000000",
        "--workers",
        "4",
        "--param",
        "stop_after_first=1",
        "--max-failures",
        "0",
        "--json",
    )
    assert out.returncode == 1, out.stderr
    summary = json.loads(out.stdout)
    assert summary["status"] == "aborted" and summary["succeeded"] >= 1
    [(produced,)] = query(db_url, "SELECT produced FROM probe")
    assert produced < 10_000, f"{produced} items were produced before the first was processed"


def test_read_modify_write_loses_no_update(cli, write_job, db_url):
    write_job("counter", COUNTER)
    out = cli("run", "counter", "--database-url", db_url, "--workers", "8", "--param", "n=300")
    assert out.returncode == 0, out.stderr + out.stdout
    assert query(db_url, "SELECT n FROM counter") == [(300,)]


def test_params_reach_the_job(cli, write_job, sqlite_url):
    write_job(
        "echo",
        """
        from sqlalchemy import text
        def setup(ctx, session):
            session.execute(text("CREATE TABLE IF NOT EXISTS kv (k TEXT, v TEXT)"))
        def items(ctx, session):
            return sorted(ctx.params.items())
        def process(ctx, session, item):
            session.execute(text("INSERT INTO kv VALUES (:k, :v)"), {"k": item[0], "v": item[1]})
    """,
    )
    out = cli(
        "run", "echo", "--database-url", sqlite_url, "--param", "a=1", "--param", "b=x=y", "--param", "c="
    )
    assert out.returncode == 0, out.stderr
    assert query(sqlite_url, "SELECT k, v FROM kv ORDER BY k") == [("a", "1"), ("b", "x=y"), ("c", "")]


def test_orm_instances_are_refused_as_items(cli, write_job, sqlite_url):
    write_job(
        "ormitems",
        """
        from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
        class Base(DeclarativeBase): pass
        class Thing(Base):
            __tablename__ = "things"
            id: Mapped[int] = mapped_column(primary_key=True)
        def setup(ctx, session):
            Base.metadata.create_all(session.connection())
            session.merge(Thing(id=1))
        def items(ctx, session):
            yield from session.query(Thing)
        def process(ctx, session, item):
            pass
    """,
    )
    out = cli("run", "ormitems", "--database-url", sqlite_url)
    # Refused like an item that cannot travel in a distributed run: one line,
    # exit 2, the run recorded as failed with that line.
    assert out.returncode == 2, out.stderr
    [line] = out.stderr.strip().splitlines()
    assert "ORM instance (Thing)" in line
    [(status, error)] = query(sqlite_url, "SELECT status, error FROM jobrunner_runs")
    assert status == "failed" and "ORM instance (Thing)" in error


def test_demo_update_job_on_a_fresh_folder(tmp_path, cli, db_url):
    """The README's first command: the real example job, twice (safe to rerun)."""
    shutil.copy(REPO / "jobs" / "update.py", tmp_path / "jobs" / "update.py")
    first = cli("run", "update", "--database-url", db_url, "--json")
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["succeeded"] == 2000 and summary["failed"] == 0
    changes = query(db_url, "SELECT count(*) FROM price_changes")[0][0]
    assert changes > 1000
    second = cli("run", "update", "--database-url", db_url, "--json")
    assert second.returncode == 0, second.stderr
    assert query(db_url, "SELECT count(*) FROM price_changes")[0][0] == changes


def test_default_database_is_sqlite_in_the_current_folder(tmp_path, cli):
    shutil.copy(REPO / "jobs" / "update.py", tmp_path / "jobs" / "update.py")
    out = cli("run", "update", "--param", "limit=50")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "jobrunner.db").exists()
    assert "update: succeeded: 50 succeeded, 0 failed" in out.stdout


def test_config_file_paths_resolve_against_its_folder(tmp_path, cli, write_job):
    """cron runs from $HOME: a config elsewhere still finds its jobs and database."""
    write_job("record", RECORD)
    (tmp_path / "jobrunner.toml").write_text(
        'database_url = "sqlite:///state/db.sqlite"\n[jobs.record]\nworkers = 2\n'
    )
    (tmp_path / "state").mkdir()
    home = tmp_path / "home"
    home.mkdir()
    out = cli(
        "run", "record", "--config", str(tmp_path / "jobrunner.toml"), "--param", "n=20", "--json", cwd=home
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["workers"] == 2
    assert query(f"sqlite:///{tmp_path / 'state/db.sqlite'}", "SELECT count(*) FROM seen") == [(20,)]


def test_environment_variables_configure_every_command(tmp_path, cli, write_job, sqlite_url):
    write_job("record", RECORD)
    other = tmp_path / "elsewhere"
    other.mkdir()
    env = {
        "JOBRUNNER_DATABASE_URL": sqlite_url,
        "JOBRUNNER_WORKERS": "3",
        "JOBRUNNER_JOBS_PATH": str(tmp_path / "jobs"),
    }
    out = cli("run", "record", "--param", "n=5", "--json", env=env, cwd=other)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["workers"] == 3
    listed = cli("list", env=env, cwd=other)
    assert listed.returncode == 0 and listed.stdout.startswith("record")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["run", "nope"], "unknown job 'nope'"),
        (["run", "bad name"], "invalid job name"),
        (["run", "record", "--workers", "0"], "--workers"),
        (["run", "record", "--workers", "x"], "--workers"),
        (["run", "record", "--param", "novalue"], "KEY=VALUE"),
        (["run", "record", "--database-url", "sqlite:///:memory:"], "in-memory"),
        (["run", "record", "--database-url", "oracle://u@h/db"], "not supported"),
        (["run", "record", "--config", "missing.toml"], "does not exist"),
        (["run", "record", "--resume"], "cannot be resumed"),
        (["frobnicate"], "No such command"),
    ],
)
def test_usage_errors_exit_2_with_one_line(cli, write_job, sqlite_url, args, fragment):
    write_job("record", RECORD)
    if "--database-url" not in args:
        args = [*args, "--database-url", sqlite_url] if args[0] == "run" else args
    out = cli(*args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert fragment in lines[0]
    assert "Traceback" not in out.stderr


def test_sqlite_refuses_more_workers_than_the_process_can_connect_before_any_thread(cli, write_job, tmp_path):
    """`--workers 100000` once started ~22,000 threads, failed, and never exited."""
    write_job("record", RECORD)
    started = time.monotonic()
    out = cli("run", "record", "--database-url", "sqlite:///fresh.db", "--workers", "100000", "--json")
    assert out.returncode == 2, out.stderr
    [line] = out.stderr.strip().splitlines()
    assert "--workers 100000" in line and "ulimit -n" in line
    assert json.loads(out.stdout)["exit_code"] == 2
    assert time.monotonic() - started < 30
    assert not (tmp_path / "fresh.db").exists(), "a refused run created the database"


def test_broken_job_module_names_file_and_line(cli, write_job, sqlite_url):
    path = write_job("broken", "import os\n\nos.environ['X'] = 1\n")
    out = cli("run", "broken", "--database-url", sqlite_url)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"jobrunner: error: job 'broken' failed to import: {path}:3: TypeError: str expected, not int"
    )


def test_unreachable_database_exits_69_without_the_password(cli, write_job):
    write_job("record", RECORD)
    out = cli("run", "record", "--database-url", "postgresql+psycopg2://app:hunter2secret@127.0.0.1:1/app")
    assert out.returncode == 69
    assert "cannot connect" in out.stderr and "hunter2secret" not in out.stderr + out.stdout
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.postgres
def test_unknown_database_and_bad_credentials_exit_69(cli, write_job, pg_url):
    write_job("record", RECORD)
    base = pg_url.rsplit("/", 1)[0]
    out = cli("run", "record", "--database-url", f"{base}/no_such_database")
    assert out.returncode == 69, out.stderr
    assert "no_such_database" in out.stderr
    bad_user = base.replace("postgres@", "nobody:topsecretpw@") + "/postgres"
    out = cli("run", "record", "--database-url", bad_user)
    assert out.returncode == 69, out.stderr
    assert "topsecretpw" not in out.stderr + out.stdout


def test_python_dash_m_works(tmp_path, write_job, sqlite_url):
    import subprocess
    import sys

    write_job("record", RECORD)
    out = subprocess.run(
        [sys.executable, "-m", "jobrunner", "run", "record", "--database-url", sqlite_url, "--param", "n=3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr


def test_list_shows_jobs_and_summaries(cli, write_job):
    write_job("record", RECORD)
    write_job("lazy", LAZY)
    out = cli("list")
    assert out.returncode == 0
    assert out.stdout.splitlines() == [
        "lazy    A generator of many no-op items.",
        "record  Record which thread and session processed each item.",
    ]
    as_json = json.loads(cli("list", "--json").stdout)
    assert [j["job"] for j in as_json] == ["lazy", "record"]


def test_a_read_only_sqlite_file_is_refused_even_as_root(cli, write_job, tmp_path):
    """As root, os.access() says every file is writable: the mode bits decide."""
    write_job("record", RECORD)
    assert cli("run", "record", "--database-url", "sqlite:///ro.db").returncode == 0
    db = tmp_path / "ro.db"
    before = db.read_bytes()
    db.chmod(0o444)
    out = cli("run", "record", "--database-url", "sqlite:///ro.db")
    assert out.returncode == 2, out.stderr
    [line] = out.stderr.strip().splitlines()
    assert "read-only" in line
    assert db.read_bytes() == before, "a read-only database was written to"
