"""What the operator sees: a terminal, cron, --quiet, --json, metrics, crontab."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from pathlib import Path

import pexpect
from conftest import clean_env, jobrunner_exe
from helpers import finish, wait_for_rows
from jobkit import RECORD, TWO_ROWS

ANSI = re.compile(r"\x1b\[")
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


def test_terminal_gets_a_progress_bar_and_a_summary_table(tmp_path, write_job, sqlite_url):
    write_job("two_rows", TWO_ROWS)
    cmd = shlex.join(
        [
            *jobrunner_exe(),
            "run",
            "two_rows",
            "--database-url",
            sqlite_url,
            "--param",
            "n=30",
            "--param",
            "sleep=0.05",
            "--param",
            "x=1",
        ]
    )
    child = pexpect.spawn(
        "/bin/sh",
        ["-c", cmd],
        cwd=str(tmp_path),
        env=clean_env(COLUMNS="120"),
        encoding="utf-8",
        timeout=60,
        dimensions=(40, 120),
    )
    child.expect(pexpect.EOF)
    child.close()
    screen = child.before
    assert child.exitstatus == 0, screen
    assert ANSI.search(screen), "no escape codes on a terminal"
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
    assert "items/s" in plain and "30/30" in plain and "0 failed" in plain
    assert re.search(r"succeeded\s*│\s*30\s*│", plain), plain[-2000:]
    assert re.search(r"rate\s*│\s*[\d.]+ items/s", plain) and "duration" in plain


def test_not_a_terminal_gets_plain_timestamped_lines(cli, write_job, sqlite_url):
    write_job("two_rows", TWO_ROWS)
    out = cli(
        "run",
        "two_rows",
        "--database-url",
        sqlite_url,
        "--param",
        "n=12",
        "--param",
        "sleep=0.1",
        "--progress-interval",
        "0.3",
    )
    assert out.returncode == 0, out.stderr
    assert not ANSI.search(out.stdout + out.stderr)
    lines = out.stdout.splitlines()
    assert all(STAMP.match(line) for line in lines), lines
    assert "two_rows: started, 4 workers, items of 12" in lines[0]
    assert any(re.search(r"two_rows: \d+/12 done, 0 failed, [\d.]+ items/s", line) for line in lines[1:-1])
    assert "two_rows: succeeded: 12 succeeded, 0 failed, 0 retried, 0 skipped in" in lines[-1]


def test_quiet_prints_nothing_on_success(cli, write_job, sqlite_url):
    write_job("record", RECORD)
    out = cli("run", "record", "--database-url", sqlite_url, "--param", "n=20", "--quiet")
    assert out.returncode == 0
    assert out.stdout == "" and out.stderr == ""


def test_quiet_still_reports_failures_on_stderr(cli, write_job, sqlite_url):
    write_job("record", RECORD)
    out = cli("run", "record", "--database-url", sqlite_url, "--param", "n=20", "--param", "fail=4", "-q")
    assert out.returncode == 1 and out.stdout == ""
    assert "item 4 failed: ValueError: item 4 is broken" in out.stderr
    assert "record: failed: 19 succeeded, 1 failed" in out.stderr


def test_quiet_json_still_prints_the_json(cli, write_job, sqlite_url):
    write_job("record", RECORD)
    out = cli("run", "record", "--database-url", sqlite_url, "--param", "n=5", "-q", "--json")
    assert out.returncode == 0 and out.stderr == ""
    assert json.loads(out.stdout)["succeeded"] == 5


def test_verbose_and_log_file(cli, write_job, sqlite_url, tmp_path):
    write_job("record", RECORD)
    log = tmp_path / "run.log"
    out = cli(
        "run",
        "record",
        "--database-url",
        sqlite_url,
        "--param",
        "n=3",
        "--param",
        "fail=1",
        "--log-file",
        str(log),
    )
    assert out.returncode == 1
    text = log.read_text()
    assert "item 1 failed: ValueError: item 1 is broken" in text and "Traceback" in text
    assert "Traceback" not in out.stderr
    cli("run", "record", "--database-url", sqlite_url, "--param", "n=1", "--log-file", str(log))
    assert log.read_text().startswith(text), "the log file is appended to"


def parse_metrics(path: Path) -> dict[tuple[str, str], float]:
    samples = {}
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            assert re.match(r"# (HELP|TYPE) jobrunner_\w+ ", line), line
            continue
        match = re.fullmatch(r"(jobrunner_\w+)(\{[^}]*\}) (\S+)", line)
        assert match, f"not the exposition format: {line!r}"
        samples[(match[1], match[2])] = float(match[3])
    return samples


def test_metrics_file(cli, spawn, write_job, sqlite_url, tmp_path):
    write_job("record", RECORD)
    write_job("two_rows", TWO_ROWS)
    pattern = str(tmp_path / "metrics" / "{job}.prom")
    path = tmp_path / "metrics" / "record.prom"
    t0 = time.time()
    assert (
        cli(
            "run", "record", "--database-url", sqlite_url, "--param", "n=5", "--metrics-file", pattern
        ).returncode
        == 0
    )
    first = parse_metrics(path)
    job = '{job="record"}'
    assert first[("jobrunner_last_exit_code", job)] == 0
    assert t0 <= first[("jobrunner_last_success_timestamp_seconds", job)] <= time.time()
    assert (
        first[("jobrunner_last_run_timestamp_seconds", job)]
        == first[("jobrunner_last_success_timestamp_seconds", job)]
    )
    assert first[("jobrunner_run_duration_seconds", job)] > 0
    assert first[("jobrunner_items_total", '{job="record",outcome="succeeded"}')] == 5

    # a failed run: the success stays where it was, the counter adds up
    (tmp_path / "jobrunner.toml").write_text(f'metrics_file = "{pattern}"\n')
    assert (
        cli("run", "record", "--database-url", sqlite_url, "--param", "n=5", "--param", "fail=2").returncode
        == 1
    )
    second = parse_metrics(path)
    assert second[("jobrunner_last_exit_code", job)] == 1
    assert (
        second[("jobrunner_last_success_timestamp_seconds", job)]
        == first[("jobrunner_last_success_timestamp_seconds", job)]
    )
    assert second[("jobrunner_items_total", '{job="record",outcome="succeeded"}')] == 9
    assert second[("jobrunner_items_total", '{job="record",outcome="failed"}')] == 1

    # a run that lost the lock race touches only its own timestamp
    holder = spawn("run", "two_rows", "--database-url", sqlite_url, "--param", "n=30", "--param", "sleep=0.1")
    wait_for_rows(sqlite_url, "pairs")
    assert cli("run", "two_rows", "--database-url", sqlite_url).returncode == 75
    skipped = parse_metrics(tmp_path / "metrics" / "two_rows.prom")
    assert set(skipped) == {("jobrunner_last_skipped_timestamp_seconds", '{job="two_rows"}')}
    assert finish(holder)[0] == 0
    done = parse_metrics(tmp_path / "metrics" / "two_rows.prom")
    assert ("jobrunner_last_success_timestamp_seconds", '{job="two_rows"}') in done
    assert ("jobrunner_last_skipped_timestamp_seconds", '{job="two_rows"}') in done
    assert not list((tmp_path / "metrics").glob(".*tmp")), "temporary files left behind"


def test_crontab_lines_run_under_crons_bare_environment(cli, tmp_path):
    etc = tmp_path / "etc"
    (etc / "jobs").mkdir(parents=True)
    (etc / "jobs" / "record.py").write_text(__import__("textwrap").dedent(RECORD))
    (etc / "jobs" / "other.py").write_text("def items(c, s): return []\ndef process(c, s, i): pass\n")
    config = etc / "jobrunner.toml"
    config.write_text(
        'database_url = "sqlite:///state.db"\n'
        '[jobs.record]\nschedule = "*/5 * * * *"\n'
        "[jobs.other]\nworkers = 2\n"
    )
    out = cli("crontab", "--config", str(config))
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if not line.startswith("#")]
    assert len(lines) == 1 and lines[0].startswith("*/5 * * * * /")
    assert f"run record --config {config}" in lines[0] and lines[0].endswith("--quiet")

    command = lines[0].split(" ", 5)[5]
    home = tmp_path / "home"
    home.mkdir()
    ran = subprocess.run(
        ["env", "-i", "PATH=/usr/bin:/bin", f"HOME={home}", "SHELL=/bin/sh", "/bin/sh", "-c", command],
        cwd=home,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "" and ran.stderr == ""
    assert (etc / "state.db").exists() and not (home / "jobrunner.db").exists()


def test_crontab_needs_a_config_file(cli):
    out = cli("crontab")
    assert out.returncode == 2 and "no config file" in out.stderr
