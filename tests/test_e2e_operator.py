"""After a night of cron runs, what the operator finds: the log file, history,
metrics and status tell what ran, where, what it did and why anything stopped."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from conftest import clean_env, jobrunner_exe
from helpers import execute, finish, query, wait_for_rows
from jobkit import RECORD, RESUMABLE, TWO_ROWS

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} ")


def test_paths_in_the_config_file_resolve_beside_it_under_cron(cli, tmp_path):
    etc = tmp_path / "etc"
    (etc / "jobs").mkdir(parents=True)
    (etc / "jobs" / "record.py").write_text(textwrap.dedent(RECORD))
    config = etc / "jobrunner.toml"
    config.write_text(
        'database_url = "sqlite:///state.db"\n'
        'log_file = "logs/jobrunner.log"\n'
        'metrics_file = "metrics/jobrunner_{job}.prom"\n'
    )
    home = tmp_path / "home"
    home.mkdir()
    out = cli("run", "record", "--config", str(config), "--param", "n=3", "-q", cwd=home)
    assert out.returncode == 0, out.stderr
    assert (etc / "logs" / "jobrunner.log").is_file()
    assert (etc / "metrics" / "jobrunner_record.prom").is_file()
    assert list(home.iterdir()) == [], "files landed in the current folder"


def test_a_bad_path_names_the_setting_it_came_from(cli, write_job, tmp_path):
    write_job("record", RECORD)
    (tmp_path / "blocker").write_text("a file where a folder should be")
    config = tmp_path / "jobrunner.toml"
    config.write_text('log_file = "blocker/jobrunner.log"\n')
    out = cli("run", "record", "--param", "n=1")
    assert out.returncode == 2
    assert f"(from {config}: key 'log_file')" in out.stderr and "--log-file" not in out.stderr


def story(log: Path) -> list[str]:
    lines = log.read_text().splitlines()
    stamped = [line for line in lines if LINE.match(line)]
    return stamped


def test_the_log_file_tells_every_runs_story_under_quiet(cli, spawn, write_job, sqlite_url, tmp_path):
    write_job("record", RECORD)
    write_job("two_rows", TWO_ROWS)
    log = tmp_path / "night.log"
    base = ["--database-url", sqlite_url, "--log-file", str(log), "-q"]

    assert cli("run", "record", *base, "--param", "n=3").returncode == 0
    assert cli("run", "record", *base, "--param", "n=3", "--param", "fail=1").returncode == 1

    holder = spawn("run", "two_rows", *base, "--param", "n=200", "--param", "sleep=0.05")
    wait_for_rows(sqlite_url, "pairs", minimum=4)
    assert cli("run", "two_rows", *base).returncode == 75
    holder.send_signal(signal.SIGTERM)
    assert finish(holder)[0] == 143

    killed = spawn("run", "two_rows", *base, "--param", "n=200", "--param", "sleep=0.05")
    wait_for_rows(sqlite_url, "jobrunner_runs", minimum=4)
    time.sleep(1)
    killed.send_signal(signal.SIGKILL)
    finish(killed)
    assert cli("run", "two_rows", *base, "--param", "n=2", "--param", "sleep=0").returncode == 0
    wrong = cli(
        "run", "record", "--database-url", "postgresql://u:pw@127.0.0.1:1/x", "--log-file", str(log), "-q"
    )
    assert wrong.returncode == 69

    lines = log.read_text().splitlines()
    text = "\n".join(lines)
    assert all(LINE.match(line) for line in lines if not line.startswith((" ", "Traceback", "ValueError"))), (
        text
    )
    assert len(re.findall(r"record: run \d+ started: pid \d+ on \S+, 4 workers, 3 items", text)) == 2
    assert re.search(r"record: run \d+ ended: succeeded: 3 succeeded, 0 failed.*exit 0", text)
    assert re.search(r"record: run \d+ ended: failed: 2 succeeded, 1 failed.*exit 1", text)
    assert "item 1 failed: ValueError: item 1 is broken" in text
    assert re.search(r"two_rows: not started: two_rows is already running \(pid \d+ on .*exit 75\)", text)
    assert "SIGTERM received" in text and re.search(r"two_rows: run \d+ ended: interrupted.*exit 143", text)
    assert "marked 1 earlier run(s) of two_rows as crashed" in text
    assert "cannot connect to postgresql+psycopg2://u:***@127.0.0.1:1/x" in text


def test_history_of_a_killed_run_shows_what_it_committed(cli, spawn, write_job, db_url):
    write_job("resumable", RESUMABLE)
    victim = spawn("run", "resumable", "--database-url", db_url, "--param", "n=5000", "--param", "sleep=0.01")
    wait_for_rows(db_url, "effects", minimum=10)
    time.sleep(6)  # one checkpoint (every 5 s) has happened
    victim.send_signal(signal.SIGKILL)
    finish(victim)
    [(committed,)] = query(db_url, "SELECT count(*) FROM effects")
    assert cli("run", "resumable", "--database-url", db_url, "--param", "n=1").returncode == 0
    listing = json.loads(cli("history", "resumable", "--database-url", db_url, "--json").stdout)
    dead = listing[1]
    assert dead["status"] == "crashed" and dead["pid"] == victim.pid
    assert "its end was never recorded" in dead["error"]
    # within one checkpoint of the truth: at most 5 s of 4 workers' items behind
    assert 0 < dead["succeeded"] <= committed
    assert committed - dead["succeeded"] <= 5 * 4 / 0.01
    human = cli("history", "resumable", "--database-url", db_url).stdout.splitlines()
    assert human[0].split() == [
        "id",
        "job",
        "status",
        "started",
        "duration",
        "ok",
        "failed",
        "retried",
        "skipped",
        "host",
        "pid",
        "procs",
        "error",
    ]
    assert str(victim.pid) in human[2] and re.search(r"crashed .* >\d+\.\ds", human[2])


def test_status_shows_runs_under_no_lock(cli, spawn, write_job, db_url, tmp_path):
    write_job("two_rows", TWO_ROWS)
    # The run stays until it is killed below (it waits for a gate never opened),
    # however long the two status commands take to start on a busy machine.
    gate = f"gate={tmp_path / 'never'}"
    run = spawn("run", "two_rows", "--database-url", db_url, "--no-lock", "--param", "n=4", "--param", gate)
    wait_for_rows(db_url, "pairs")
    out = cli("status", "--database-url", db_url)
    assert f"two_rows  running without a lock: run 1 (pid {run.pid} on " in out.stdout
    rows = json.loads(cli("status", "--database-url", db_url, "--json").stdout)
    assert rows[0]["holder"] is None and rows[0]["unlocked_runs"][0]["pid"] == run.pid
    run.kill()
    finish(run)
    assert "two_rows  idle" in cli("status", "--database-url", db_url).stdout


def test_twenty_simultaneous_runs_lose_no_metrics_count(write_job, sqlite_url, tmp_path):
    write_job("record", RECORD)
    metrics = tmp_path / "m" / "{job}.prom"
    procs = [
        subprocess.Popen(
            [
                *jobrunner_exe(),
                "run",
                "record",
                "--database-url",
                sqlite_url,
                "--no-lock",
                "--param",
                "n=1",
                "--metrics-file",
                str(metrics),
                "-q",
            ],
            cwd=tmp_path,
            env=clean_env(),
        )
        for _ in range(20)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0] * 20
    text = (tmp_path / "m" / "record.prom").read_text()
    assert 'jobrunner_items_total{job="record",outcome="succeeded"} 20' in text


@pytest.mark.parametrize(
    ("args", "code"),
    [(["run", "nope"], 2), (["run", "record", "--database-url", "postgresql://u:pw@127.0.0.1:1/x"], 69)],
)
def test_json_prints_one_object_even_on_errors(cli, write_job, args, code):
    write_job("record", RECORD)
    out = cli(*args, "--json")
    assert out.returncode == code
    [line] = out.stdout.splitlines()
    summary = json.loads(line)
    assert summary["status"] == "error" and summary["exit_code"] == code and summary["error"]
    assert "pw@" not in line


def test_crontab_carries_the_flags_it_was_given_or_refuses(cli, tmp_path):
    etc = tmp_path / "etc"
    (etc / "jobs").mkdir(parents=True)
    config = etc / "jobrunner.toml"
    config.write_text('[jobs.record]\nschedule = "*/5 * * * *"\n')
    other = tmp_path / "otherjobs"
    other.mkdir()
    (other / "record.py").write_text(textwrap.dedent(RECORD))
    out = cli(
        "crontab", "--config", str(config), "--jobs-path", str(other), "--database-url", "sqlite:///x.db"
    )
    assert out.returncode == 0, out.stderr
    line = out.stdout.splitlines()[1]
    assert f"--jobs-path {other}" in line and f"--database-url sqlite:///{tmp_path / 'x.db'}" in line
    secret = cli("crontab", "--config", str(config), "--database-url", "postgresql://u:hunter22@db/x")
    assert secret.returncode == 2 and "must not" in secret.stderr and "hunter22" not in secret.stderr


def test_the_rate_is_over_processing_not_setup(cli, write_job, sqlite_url):
    write_job(
        "slow_setup",
        """
        import time
        def setup(ctx, session):
            time.sleep(2)
        def items(ctx, session):
            return range(50)
        def process(ctx, session, item):
            pass
        """,
    )
    out = cli("run", "slow_setup", "--database-url", sqlite_url, "--json")
    summary = json.loads(out.stdout)
    assert summary["duration_seconds"] > 2 and summary["items_seconds"] < 1.5
    assert summary["items_per_second"] > 50 / 1.5


@pytest.mark.postgres
def test_a_held_lock_leaves_no_error_in_the_server_log(cli, spawn, write_job, pg_url, pg_server_log):
    if pg_server_log is None:
        pytest.skip("the server's log is not ours to read")
    write_job("two_rows", TWO_ROWS)
    holder = spawn("run", "two_rows", "--database-url", pg_url, "--param", "n=200", "--param", "sleep=0.1")
    wait_for_rows(pg_url, "pairs")
    for _ in range(3):
        assert cli("run", "two_rows", "--database-url", pg_url).returncode == 75
    assert cli("status", "--database-url", pg_url).returncode == 0
    assert finish(holder)[0] == 0
    assert "could not obtain lock" not in pg_server_log.read_text()


@pytest.mark.parametrize(
    "args",
    [
        ["run", "record", "--frob", "--json"],
        ["run", "record", "--json", "--workers"],
        ["--json", "frobnicate"],
    ],
    ids=["unknown-option-before-json", "missing-value-after-json", "unknown-command"],
)
def test_json_anywhere_on_a_line_that_click_refuses_still_prints_one_object(cli, write_job, args):
    write_job("record", RECORD)
    out = cli(*args)
    assert out.returncode == 2, out.stderr
    [line] = out.stdout.splitlines()
    summary = json.loads(line)
    assert summary["status"] == "error" and summary["exit_code"] == 2 and summary["error"]
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.postgres
def test_a_missing_privilege_is_a_configuration_error_not_an_outage(cli, write_job, pg_url):
    """Exit 69 told cron to try again later, forever: a grant is what it needs."""
    from sqlalchemy.engine import make_url

    write_job("record", RECORD)
    assert cli("run", "record", "--database-url", pg_url).returncode == 0  # jobrunner's tables exist
    role = f"limited_{os.getpid()}"
    execute(pg_url, f"CREATE ROLE {role} LOGIN")
    try:
        limited = make_url(pg_url).set(username=role).render_as_string(hide_password=False)
        out = cli("run", "record", "--database-url", limited, "--json")
        assert out.returncode == 2, out.stderr
        [line] = out.stderr.strip().splitlines()
        assert "permission denied for table jobrunner_" in line and "GRANT" in line, line
        assert json.loads(out.stdout)["exit_code"] == 2
    finally:
        execute(pg_url, f"DROP OWNED BY {role}")
        execute(pg_url, f"DROP ROLE {role}")


def test_crontab_refuses_a_schedule_whose_job_module_does_not_exist(cli, tmp_path):
    etc = tmp_path / "etc"
    (etc / "jobs").mkdir(parents=True)
    (etc / "jobs" / "record.py").write_text(textwrap.dedent(RECORD))
    config = etc / "jobrunner.toml"
    config.write_text('[jobs.record]\nschedule = "*/5 * * * *"\n[jobs.gone]\nschedule = "@daily"\n')
    out = cli("crontab", "--config", str(config))
    assert out.returncode == 2 and out.stdout == ""
    [line] = out.stderr.strip().splitlines()
    assert "[jobs.gone]" in line and "gone.py" in line and "record" not in line


def test_resume_true_in_the_config_resumes_under_cron_and_is_carried_into_its_line(cli, write_job, tmp_path):
    write_job("resumable", RESUMABLE)
    (tmp_path / "jobrunner.toml").write_text(
        'database_url = "sqlite:///state.db"\n[jobs.resumable]\nschedule = "*/5 * * * *"\nresume = true\n'
    )
    [line] = [x for x in cli("crontab").stdout.splitlines() if not x.startswith("#")]
    assert " --resume " in line
    log = tmp_path / "run.log"
    out = cli("run", "resumable", "--log-file", str(log))
    assert out.returncode == 0, out.stderr
    text = log.read_text()
    assert "nothing to resume" in text
    assert not any("WARNING" in x for x in text.splitlines() if "nothing to resume" in x), text


@pytest.mark.postgres
def test_a_config_file_that_hands_out_the_password_says_so(cli, write_job, pg_url, tmp_path):
    """libpq ignores a ~/.pgpass with group or world access; ssh refuses such keys."""
    from sqlalchemy.engine import make_url

    write_job("record", RECORD)
    with_password = make_url(pg_url).set(password="s3cret-pw").render_as_string(hide_password=False)
    config = tmp_path / "jobrunner.toml"
    config.write_text(f'database_url = "{with_password}"\n')
    config.chmod(0o644)
    out = cli("run", "record", "--quiet")
    assert out.returncode == 0, out.stderr
    [line] = [x for x in out.stderr.splitlines() if "chmod 600" in x]
    assert str(config) in line and "s3cret-pw" not in out.stderr
    config.chmod(0o600)
    out = cli("run", "record", "--quiet")
    assert out.returncode == 0 and "chmod" not in out.stderr, out.stderr


def test_a_start_that_ends_before_its_run_still_counts_for_monitoring(cli, write_job, tmp_path):
    """A refused database (exit 69) wrote no metric, and its log line no exit code."""
    write_job("record", RECORD)
    refused = "postgresql://u:pw@127.0.0.1:1/x"
    out = cli(
        "run", "record", "--database-url", refused, "--metrics-file", "m/{job}.prom", "--log-file", "run.log"
    )
    assert out.returncode == 69, out.stderr
    text = (tmp_path / "m" / "record.prom").read_text()
    assert 'jobrunner_last_exit_code{job="record"} 69' in text
    assert 'jobrunner_last_run_timestamp_seconds{job="record"}' in text
    assert "jobrunner_items_total" not in text and "jobrunner_last_success" not in text
    [line] = [x for x in (tmp_path / "run.log").read_text().splitlines() if "cannot connect" in x]
    assert "(exit 69)" in line and "pw@" not in line
