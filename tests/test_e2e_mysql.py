"""What is particular to MySQL and MariaDB. The shared contract (items exactly
once, exit codes, locks, dry runs, resume, batches) runs on MariaDB through the
``db_url`` fixture of the other test files."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import clean_env
from helpers import assert_whole_items, execute, finish, query, wait_for_rows
from jobkit import RECORD, TWO_ROWS

pytestmark = pytest.mark.mysql


def test_connections_name_themselves(spawn, write_job, mysql_url):
    write_job("two_rows", TWO_ROWS)
    run = spawn("run", "two_rows", "--database-url", mysql_url, "--param", "n=60", "--param", "sleep=0.1")
    wait_for_rows(mysql_url, "pairs")
    names = {
        name
        for (name,) in query(
            mysql_url,
            "SELECT ATTR_VALUE FROM performance_schema.session_connect_attrs "
            "WHERE ATTR_NAME = 'program_name'",
        )
    }
    assert {"jobrunner two_rows", "jobrunner two_rows lock"} <= names, names
    assert finish(run)[0] == 0


def test_server_idle_timeouts_do_not_end_a_long_run(cli, write_job, mysql_url, mysql_admin_url):
    """The lock's transaction idles for the whole run; the workers' pooled
    connections idle between items. A server that ends idle sessions after 1 s
    must end neither."""
    settings = ("wait_timeout", "idle_transaction_timeout", "idle_write_transaction_timeout")
    before = {name: query(mysql_admin_url, f"SELECT @@GLOBAL.{name}")[0][0] for name in settings}
    for name in settings:
        execute(mysql_admin_url, f"SET GLOBAL {name} = 1")
    try:
        write_job("two_rows", TWO_ROWS)
        out = cli(
            "run",
            "two_rows",
            "--database-url",
            mysql_url,
            "-w",
            "2",
            "--param",
            "n=12",
            "--param",
            "sleep=0.5",
            "--json",
        )
    finally:
        for name, value in before.items():
            execute(mysql_admin_url, f"SET GLOBAL {name} = {value}")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["status"] == "succeeded" and summary["succeeded"] == 12
    assert "lock in doubt" not in out.stderr


def test_a_killed_lock_connection_is_taken_again_and_in_flight_items_never_commit(
    spawn, write_job, mysql_url
):
    write_job("two_rows", TWO_ROWS)
    run = spawn(
        "run",
        "two_rows",
        "--database-url",
        mysql_url,
        "--param",
        "n=12",
        "--param",
        "sleep=2",
        "--heartbeat",
        "0.2",
        "--json",
    )
    wait_for_rows(mysql_url, "jobrunner_runs")
    time.sleep(1.0)
    [(conn_id,)] = query(
        mysql_url,
        "SELECT PROCESSLIST_ID FROM performance_schema.session_connect_attrs "
        "WHERE ATTR_NAME = 'program_name' AND ATTR_VALUE = 'jobrunner two_rows lock'",
    )
    killed_at = time.time()
    execute(mysql_url, f"KILL CONNECTION {conn_id}")
    code, _, err = finish(run, timeout=60)
    assert code == 0, err
    assert "lock in doubt" in err and "lock taken again" in err
    assert err.index("lock in doubt") < err.index("lock taken again"), err
    stale = query(mysql_url, f"SELECT item FROM pairs WHERE part = 2 AND t0 < {killed_at}")
    assert stale == [], f"items begun before the loss committed after it: {stale}"
    assert_whole_items(mysql_url)


def test_advisory_mode_is_get_lock(spawn, cli, write_job, mysql_url, tmp_path):
    write_job("two_rows", TWO_ROWS)
    (tmp_path / "jobrunner.toml").write_text('[jobs.two_rows]\nlock = "advisory"\n')
    # One worker: about 6 s, so a loser that takes seconds to start on a busy machine still meets it.
    holder = spawn(
        "run", "two_rows", "--database-url", mysql_url, "-w", "1", "--param", "n=60", "--param", "sleep=0.1"
    )
    wait_for_rows(mysql_url, "pairs")
    loser = cli("run", "two_rows", "--database-url", mysql_url)
    assert loser.returncode == 75 and f"pid {holder.pid}" in loser.stderr
    assert query(
        mysql_url,
        "SELECT COUNT(*) FROM information_schema.innodb_trx WHERE trx_mysql_thread_id IN "
        "(SELECT PROCESSLIST_ID FROM performance_schema.session_connect_attrs WHERE "
        "ATTR_VALUE = 'jobrunner two_rows lock')",
    ) == [(0,)], "GET_LOCK needs no transaction"
    assert finish(holder)[0] == 0
    assert cli("run", "two_rows", "--database-url", mysql_url, "--param", "n=2").returncode == 0


CREATES = """
from sqlalchemy import text
def setup(ctx, session):
    session.execute(text("CREATE TABLE fresh_table (k INTEGER)"))
def items(ctx, session):
    return [1]
def process(ctx, session, item):
    session.execute(text("INSERT INTO fresh_table VALUES (1)"))
"""


def test_a_dry_run_refuses_ddl_it_could_not_undo(cli, write_job, mysql_url):
    write_job("creates", CREATES)
    out = cli("run", "creates", "--database-url", mysql_url, "--dry-run")
    assert out.returncode == 1
    assert "cannot undo DDL (CREATE TABLE fresh_table" in out.stderr
    assert query(mysql_url, "SHOW TABLES LIKE 'fresh_table'") == [], "the dry run left a table behind"


def test_a_mysql_url_without_the_driver_says_which_extra_to_install(write_job, tmp_path):
    write_job("record", RECORD)
    code = (
        "import sys; sys.modules['pymysql'] = None\n"
        "from jobrunner.cli import main\n"
        "sys.argv = ['jobrunner', 'run', 'record', '--database-url', 'mysql://u:pw@127.0.0.1/x']\n"
        "main()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=clean_env(), capture_output=True, text=True
    )
    assert out.returncode == 2
    [line] = out.stderr.strip().splitlines()
    assert "pip install 'jobrunner[mysql]'" in line and "pw" not in line.replace("pip", "")
