"""Data safety as a new user meets it: lost updates, leaked passwords, a dry run
that must tell the truth, and errors that name the real problem."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest
from helpers import execute, query
from jobkit import NAIVE_COUNTER, RECORD
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url


def run_json(cli, *args, **kw):
    out = cli(*args, "--json", **kw)
    lines = out.stdout.splitlines()
    assert len(lines) == 1, f"stdout must hold one JSON object: {out.stdout!r} {out.stderr}"
    return out, json.loads(lines[0])


# -- 1. no silent lost update ------------------------------------------------------------
def test_read_modify_write_of_a_hot_row_never_loses_an_update_silently(cli, write_job, db_url):
    """2,000 naive increments over 8 workers: every committed item is in the
    counter; items that could not be done are failures, with exit 1."""
    write_job("counter", NAIVE_COUNTER)
    out, summary = run_json(cli, "run", "counter", "--database-url", db_url, "-w", "8", "--param", "n=2000")
    [(n,)] = query(db_url, "SELECT n FROM counter")
    assert n == summary["succeeded"], f"{summary['succeeded']} items committed but the counter says {n}"
    assert summary["succeeded"] + summary["failed"] == 2000
    if summary["failed"]:
        assert out.returncode == 1 and summary["status"] == "failed"
        # PostgreSQL: a serialization failure; MySQL/MariaDB: a deadlock (1213)
        assert all(
            "SerializationFailure" in f["error"] or "Deadlock" in f["error"] for f in summary["failures"]
        ), summary["failures"][:3]
    else:
        assert out.returncode == 0 and n == 2000
    if db_url.startswith("sqlite"):
        assert n == 2000 and out.returncode == 0, "BEGIN IMMEDIATE serialises SQLite's writers"


ISOLATION_PROBE = """
from sqlalchemy import text
def setup(ctx, session):
    session.execute(text("CREATE TABLE IF NOT EXISTS seen (level TEXT)"))
def items(ctx, session):
    return [1]
def process(ctx, session, item):
    level = session.execute(text("SHOW transaction_isolation")).scalar()
    session.execute(text("INSERT INTO seen VALUES (:l)"), {"l": level})
"""


@pytest.mark.postgres
def test_isolation_default_flag_and_job_constant(cli, write_job, pg_url, tmp_path):
    write_job("probe", ISOLATION_PROBE)
    write_job("probe_rc", 'ISOLATION = "read_committed"\n' + ISOLATION_PROBE)
    assert cli("run", "probe", "--database-url", pg_url).returncode == 0
    assert cli("run", "probe", "--database-url", pg_url, "--isolation", "serializable").returncode == 0
    assert cli("run", "probe_rc", "--database-url", pg_url).returncode == 0
    (tmp_path / "jobrunner.toml").write_text('[jobs.probe_rc]\nisolation = "repeatable_read"\n')
    assert cli("run", "probe_rc", "--database-url", pg_url).returncode == 0
    levels = [level for (level,) in query(pg_url, "SELECT level FROM seen")]
    assert levels == ["repeatable read", "serializable", "read committed", "repeatable read"]


# -- 2. passwords never shown ------------------------------------------------------------------
PASSWORDS = ["WrongPw/Special7", "with space", "colon:hash#quote'dq\"", "per%cent", "enc%2Fded"]
LEAKY = """
from sqlalchemy import text
def items(ctx, session):
    return [1]
def process(ctx, session, item):
    url = session.get_bind().url.render_as_string(hide_password=False)
    raise RuntimeError(f"cannot reach {url} with {session.get_bind().url.password}")
"""


def leaked(secret: str, *texts: str) -> bool:
    from urllib.parse import unquote

    plain = unquote(secret)
    forms = {secret, plain, quote(plain, safe=""), quote(plain, safe=" +")}
    return any(form in t for form in forms for t in texts)


@pytest.mark.parametrize("password", PASSWORDS)
def test_a_password_never_appears_when_the_connection_fails(cli, write_job, tmp_path, password):
    write_job("record", RECORD)
    log = tmp_path / "run.log"
    url = f"postgresql://app:{password}@127.0.0.1:1/app"
    out = cli("run", "record", "--database-url", url, "--json", "--log-file", str(log), "--debug")
    assert out.returncode == 69, out.stderr
    assert "cannot connect to postgresql+psycopg2://app:***@127.0.0.1:1/app" in out.stderr
    assert not leaked(password, out.stdout, out.stderr, log.read_text())
    summary = json.loads(out.stdout)
    assert summary["status"] == "error" and summary["exit_code"] == 69


def test_an_unencoded_at_sign_is_refused_without_showing_the_password(cli, write_job):
    write_job("record", RECORD)
    out = cli("run", "record", "--database-url", "postgresql://app:se@cret@127.0.0.1:1/app")
    assert out.returncode == 2
    assert "%40" in out.stderr and "se@cret" not in out.stderr and "cret" not in out.stderr


ROLES = itertools.count()


@pytest.fixture
def password_role(pg_admin_url: str):
    """A role that must log in with a password (see pgserver.py's pg_hba line)."""
    created: list[str] = []

    def make(password: str) -> str:
        name = f"pw_{os.getpid()}_{next(ROLES)}"
        engine = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            literal = password.replace("'", "''")
            conn.execute(
                text(f"CREATE ROLE {name} LOGIN SUPERUSER PASSWORD '{literal}' IN ROLE password_users")
            )
        engine.dispose()
        created.append(name)
        return name

    return make  # roles own the test database's tables: they go with the server


@pytest.mark.postgres
@pytest.mark.parametrize("password", ["Right/Pw Spe:cial#7'\"%", "p%40ss"])
def test_passwords_stay_secret_through_auth_failures_and_job_errors(
    cli, write_job, pg_url, password_role, tmp_path, password
):
    if os.environ.get("JOBRUNNER_TEST_DATABASE_URL"):
        pytest.skip("needs the suite's own server (a password role in pg_hba.conf)")
    role = password_role(password)
    base = make_url(pg_url)
    good = base.set(username=role, password=password).render_as_string(hide_password=False)
    assert quote(password, safe=" +") in good  # the URL holds an encoded form
    wrong = good.replace(quote(password, safe=" +"), quote(password[::-1], safe=" +"))
    write_job("leaky", LEAKY)
    log = tmp_path / "run.log"

    refused = cli("run", "leaky", "--database-url", wrong, "--json", "--log-file", str(log), "--debug")
    assert refused.returncode == 69, refused.stderr
    assert "password authentication failed" in refused.stderr
    assert not leaked(password[::-1], refused.stdout, refused.stderr, log.read_text())

    failing = cli("run", "leaky", "--database-url", good, "--json", "--log-file", str(log), "--debug")
    assert failing.returncode == 1, failing.stderr
    texts = (failing.stdout, failing.stderr, log.read_text())
    assert "Traceback" in failing.stderr and "Traceback" in texts[2]
    assert "cannot reach" in failing.stdout and "***" in failing.stdout
    assert not leaked(password, *texts), "the job's own error leaked the password"


# -- 3. malformed URLs and unusable SQLite paths ---------------------------------------------
@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("postgresql://u:pw@127.0.0.1:notaport/db", "port 'notaport' is not a number"),
        ("postgresql://u:pw@127.0.0.1:99999/db", "port '99999'"),
        ("sqlite:///no/such/folder/x.db", "the folder"),
    ],
)
def test_bad_urls_exit_2_naming_the_problem(cli, write_job, url, fragment, tmp_path):
    write_job("record", RECORD)
    out = cli("run", "record", "--database-url", url)
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and fragment in out.stderr
    assert "pw" not in out.stderr.replace("password", "")
    assert not (tmp_path / "no").exists()


def make_read_only(path: Path) -> None:
    """Read-only even for root: the immutable attribute where the file system has
    it, else a read-only bind mount of the folder."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.fail("cannot make a file read-only for root here (chattr +i failed)")


def undo_read_only(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    path.chmod(0o644)


def test_read_only_sqlite_file_is_named_and_nothing_is_left_behind(cli, write_job, tmp_path):
    write_job("record", RECORD)
    db = tmp_path / "ro.db"
    url = f"sqlite:///{db}"
    assert cli("run", "record", "--database-url", url, "--param", "n=3").returncode == 0
    for extra in tmp_path.glob("ro.db*"):
        if extra != db:
            extra.unlink()
    make_read_only(db)
    try:
        out = cli("run", "record", "--database-url", url, "--param", "n=3")
    finally:
        undo_read_only(db)
    assert out.returncode == 2, out.stderr
    assert f"SQLite database {db} is read-only" in out.stderr
    assert sorted(p.name for p in tmp_path.glob("ro.db*")) == ["ro.db"], "stray files left behind"


@pytest.mark.parametrize("command", [["history"], ["status"], ["history", "--purge-before", "2020-01-01"]])
def test_read_only_commands_never_create_a_database(cli, write_job, tmp_path, command):
    write_job("record", RECORD)
    out = cli(*command, "--database-url", "sqlite:///typo.db")
    assert out.returncode == 2, out.stderr
    assert f"SQLite database {tmp_path / 'typo.db'} does not exist" in out.stderr
    assert not (tmp_path / "typo.db").exists()


@pytest.mark.postgres
def test_read_only_commands_create_no_tables(cli, write_job, pg_url):
    write_job("record", RECORD)
    assert cli("history", "--database-url", pg_url).stdout.strip() == "no runs recorded"
    assert cli("status", "--database-url", pg_url).returncode == 0
    assert query(pg_url, "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'jobrunner%'") == [(0,)]


# -- 4. more workers than the server can connect --------------------------------------------
@pytest.mark.postgres
def test_more_workers_than_connections_is_refused_before_any_item(cli, write_job, pg_url):
    write_job("record", RECORD)
    database = make_url(pg_url).database
    execute(pg_url, f"ALTER DATABASE {database} CONNECTION LIMIT 12")
    out = cli("run", "record", "--database-url", pg_url, "-w", "20", "--param", "n=50")
    assert out.returncode == 2, out.stderr
    assert "--workers 20 needs 24 database connections" in out.stderr
    assert "the database's connection limit is 12" in out.stderr

    # Enough in principle, but other clients hold the slots now: exit 69.
    engine = create_engine(pg_url, pool_size=8, max_overflow=0)
    held = [engine.connect() for _ in range(8)]
    try:
        busy = cli("run", "record", "--database-url", pg_url, "-w", "6", "--param", "n=50")
    finally:
        for conn in held:
            conn.close()
        engine.dispose()
    assert busy.returncode == 69, busy.stderr
    assert "only" in busy.stderr and "are free now" in busy.stderr
    tables = query(pg_url, "SELECT count(*) FROM pg_tables WHERE tablename = 'seen'")
    assert tables == [(0,)], "no item may run before the check"
    ok = cli("run", "record", "--database-url", pg_url, "-w", "6", "--param", "n=50")
    assert ok.returncode == 0, ok.stderr


# -- 5. a dry run that tells the truth ------------------------------------------------------
REFRESH = '''
"""setup() clears last run's rows; each item inserts its fresh row; item k needs item k-1's."""
from sqlalchemy import text

def setup(ctx, session):
    session.execute(text("CREATE TABLE IF NOT EXISTS fresh (k INTEGER PRIMARY KEY)"))
    session.execute(text("DELETE FROM fresh"))

def items(ctx, session):
    return range(200)

def process(ctx, session, k):
    session.execute(text("INSERT INTO fresh VALUES (:k)"), {"k": k})
    if ctx.params.get("chain") and k and not session.execute(
        text("SELECT count(*) FROM fresh WHERE k = :p"), {"p": k - 1}
    ).scalar():
        raise RuntimeError(f"item {k - 1} is missing")
'''


def test_dry_run_sees_setups_effects_and_earlier_items(cli, write_job, db_url):
    write_job("refresh", REFRESH)
    first = cli("run", "refresh", "--database-url", db_url, "-w", "1", "--param", "chain=1")
    assert first.returncode == 0, first.stderr
    before = query(db_url, "SELECT count(*), min(k), max(k) FROM fresh")
    out, summary = run_json(
        cli, "run", "refresh", "--database-url", db_url, "--dry-run", "--param", "chain=1"
    )
    assert out.returncode == 0, out.stderr
    assert (summary["succeeded"], summary["failed"]) == (200, 0)
    assert summary["changes"] == {"fresh": {"insert": 200, "update": 0, "delete": 200}}
    assert query(db_url, "SELECT count(*), min(k), max(k) FROM fresh") == before, "a dry run changed data"


# -- 6. SQLite and slow items ---------------------------------------------------------------
SLOW = """
import time
from sqlalchemy import text

def setup(ctx, session):
    session.execute(text("CREATE TABLE IF NOT EXISTS slow (k INTEGER)"))

def items(ctx, session):
    return range(24)

def prepare(ctx, k):
    if ctx.params.get("where") == "prepare":
        start = time.monotonic()
        time.sleep(0.2)  # the slow call, before the item's transaction
        with open(ctx.params["spans"], "a") as f:
            f.write(f"{start} {time.monotonic()}\\n")
    return k

def process(ctx, session, k):
    session.execute(text("INSERT INTO slow VALUES (:k)"), {"k": k})
    if ctx.params.get("where") == "process":
        time.sleep(0.2)  # the slow call, holding SQLite's write lock
"""


def test_sqlite_slow_work_in_prepare_overlaps_and_in_process_is_called_out(
    cli, write_job, sqlite_url, tmp_path
):
    write_job("slow", SLOW)
    spans = tmp_path / "spans"
    fast, _ = run_json(
        cli,
        "run",
        "slow",
        "--database-url",
        sqlite_url,
        "-w",
        "8",
        "--param",
        "where=prepare",
        "--param",
        f"spans={spans}",
    )
    assert fast.returncode == 0, fast.stderr
    # Overlap is read from the calls themselves, not from a wall-clock bound a busy machine breaks.
    calls = [tuple(map(float, line.split())) for line in spans.read_text().splitlines()]
    assert len(calls) == 24
    most = max(sum(1 for s, e in calls if s <= start < e) for start, _ in calls)
    assert most >= 4, f"prepare() calls did not overlap: at most {most} at once"
    assert "write lock" not in fast.stderr

    slow = cli("run", "slow", "--database-url", sqlite_url, "-w", "8", "--param", "where=process")
    assert slow.returncode == 0, slow.stderr
    assert "held SQLite's write lock for 0.2" in slow.stderr and "prepare()" in slow.stderr
    assert query(sqlite_url, "SELECT count(*) FROM slow") == [(48,)]


SELF_COMMITTING = """
\"\"\"Domain code that commits its own work, then sometimes fails or rolls back.\"\"\"
from sqlalchemy import text

def setup(ctx, session):
    session.execute(text("CREATE TABLE IF NOT EXISTS done (item INTEGER NOT NULL)"))
    session.commit()  # setup's own commit: harmless

def items(ctx, session):
    return range(40)

def process(ctx, session, item):
    session.execute(text("INSERT INTO done VALUES (:i)"), {"i": item})
    session.commit()
    if item % 10 == 3:
        raise ValueError(f"item {item} fails after its commit")
    if item % 10 == 7:
        session.rollback()
        session.execute(text("INSERT INTO done VALUES (:i)"), {"i": 1000 + item})
"""


@pytest.mark.parametrize("batch", ["1", "10"])
def test_commits_and_rollbacks_by_the_jobs_code_never_split_an_item(cli, write_job, db_url, batch):
    """Measured on the landed runner: an item that inserted a row, called
    session.commit() and then raised was counted failed while its row stayed."""
    write_job("selfcommit", SELF_COMMITTING)
    out = cli("run", "selfcommit", "--database-url", db_url, "-b", batch, "--json")
    assert out.returncode == 1, out.stderr
    summary = json.loads(out.stdout)
    bad = {i for i in range(40) if i % 10 in (3, 7)}
    assert (summary["succeeded"], summary["failed"]) == (40 - len(bad), len(bad))
    rolled = [f for f in summary["failures"] if f["item"] in {"7", "17", "27", "37"}]
    assert all("called session.rollback()" in f["error"] for f in rolled), rolled
    rows = sorted(item for (item,) in query(db_url, "SELECT item FROM done"))
    assert rows == sorted(set(range(40)) - bad), "a failed item's own commit was kept"


SWALLOWING = """
from sqlalchemy import exc, text

def setup(ctx, session):
    session.execute(text("CREATE TABLE IF NOT EXISTS done (item INTEGER NOT NULL)"))

def items(ctx, session):
    return range(20)

def process(ctx, session, item):
    session.execute(text("INSERT INTO done VALUES (:i)"), {"i": item})
    if item % 10 == 4:
        try:
            session.execute(text("SELECT 1 / 0"))
        except exc.DBAPIError:
            pass  # caught and not raised: PostgreSQL has aborted the transaction
"""


@pytest.mark.postgres
@pytest.mark.parametrize("batch", ["1", "5"])
def test_an_item_whose_caught_error_aborted_its_transaction_fails_and_the_rest_commit(
    cli, write_job, pg_url, batch
):
    """PostgreSQL answers COMMIT of an aborted transaction by rolling back,
    without an error. Seen: '5 succeeded, 0 failed' and no row in the table;
    in chunks, the next item's statement failed and took the blame."""
    write_job("swallow", SWALLOWING)
    out = cli("run", "swallow", "--database-url", pg_url, "-b", batch, "--json")
    assert out.returncode == 1, out.stderr
    summary = json.loads(out.stdout)
    assert (summary["succeeded"], summary["failed"]) == (18, 2)
    assert sorted(f["item"] for f in summary["failures"]) == ["14", "4"]
    assert all("already given up the item's transaction" in f["error"] for f in summary["failures"])
    rows = sorted(item for (item,) in query(pg_url, "SELECT item FROM done"))
    assert rows == [i for i in range(20) if i % 10 != 4]


DEADLOCKING = """
import time
from sqlalchemy import exc, text

def setup(ctx, session):
    session.execute(text("CREATE TABLE IF NOT EXISTS pair (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"))
    session.execute(text("CREATE TABLE IF NOT EXISTS done (item INTEGER NOT NULL)"))
    session.execute(text("DELETE FROM pair"))
    session.execute(text("INSERT INTO pair VALUES (1, 0), (2, 0)"))

def items(ctx, session):
    return [0, 1]

def process(ctx, session, item):
    first, second = (1, 2) if item == 0 else (2, 1)
    session.execute(text("UPDATE pair SET n = n + 1 WHERE id = :id"), {"id": first})
    time.sleep(1)  # both hold their first row: each now waits for the other's
    try:
        session.execute(text("UPDATE pair SET n = n + 1 WHERE id = :id"), {"id": second})
    except exc.DBAPIError:
        pass  # the deadlock, caught and not raised
    session.execute(text("INSERT INTO done VALUES (:i)"), {"i": item})
"""


@pytest.mark.parametrize(
    "server",
    [pytest.param("pg_url", marks=pytest.mark.postgres), pytest.param("mysql_url", marks=pytest.mark.mysql)],
)
def test_an_item_that_caught_its_own_deadlock_fails_whole(cli, write_job, request, server):
    """The server ends one of two deadlocked transactions. MariaDB rolls it
    back and the next statement begins a new one: a COMMIT would keep the
    INSERT without the UPDATE before it (half an item). PostgreSQL would roll
    it all back at COMMIT and report nothing."""
    url = request.getfixturevalue(server)
    write_job("deadlock", DEADLOCKING)
    out = cli("run", "deadlock", "--database-url", url, "-w", "2", "--no-lock", "--json")
    assert out.returncode == 1, out.stderr
    summary = json.loads(out.stdout)
    assert (summary["succeeded"], summary["failed"]) == (1, 1), summary
    [failure] = summary["failures"]
    # MariaDB runs the INSERT in a new transaction, which jobrunner refuses to
    # commit; PostgreSQL refuses the INSERT itself, which the job lets through.
    said = "already given up the item's transaction" if server == "mysql_url" else "InFailedSqlTransaction"
    assert said in failure["error"]
    done = [item for (item,) in query(url, "SELECT item FROM done")]
    assert done == [1 - int(failure["item"])], "the failed item's INSERT was kept"
    assert sorted(n for (n,) in query(url, "SELECT n FROM pair")) == [1, 1], "an item was kept in part"


def test_a_dry_run_keeps_nothing_that_the_jobs_code_committed(cli, write_job, db_url):
    write_job("selfcommit", SELF_COMMITTING)
    assert cli("run", "selfcommit", "--database-url", db_url, "--param", "n=0").returncode in (0, 1)
    execute(db_url, "DELETE FROM done")
    out = cli("run", "selfcommit", "--database-url", db_url, "--dry-run", "--json")
    assert out.returncode == 1, out.stderr
    assert query(db_url, "SELECT count(*) FROM done") == [(0,)]
    assert json.loads(out.stdout)["changes"]["done"]["insert"] == 32
