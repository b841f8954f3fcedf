"""Fixtures: real SQLite files, a real PostgreSQL server, the CLI as a subprocess.

The PostgreSQL tests use JOBRUNNER_TEST_DATABASE_URL (an admin URL) when set;
otherwise the suite starts its own server. With CI=true a missing server is a
failure, never a skip.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).parent))
from mysqlserver import MariaDBServer, find_server
from pgserver import PostgresServer, find_bindir

TEMPLATE = "jobrunner_template"
_counter = itertools.count()


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


_shared: dict[str, PostgresServer] = {}


@pytest.fixture(scope="session")
def pg_server_log(pg_admin_url: str) -> Path | None:
    """The shared server's log file, when the suite started the server itself."""
    server = _shared.get("server")
    return server.root / "server.log" if server is not None else None


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    given = os.environ.get("JOBRUNNER_TEST_DATABASE_URL")
    server = None
    if given:
        url = given
    else:
        bindir = find_bindir()
        if bindir is None:
            message = "no PostgreSQL server binaries (pg_config --bindir) on this machine"
            if _ci():
                pytest.fail(message)
            pytest.skip(message)
        server = PostgresServer(bindir)
        try:
            server.start()
        except (subprocess.CalledProcessError, OSError) as error:
            detail = getattr(error, "stderr", b"") or b""
            message = f"cannot start PostgreSQL: {error} {detail.decode(errors='replace')}"
            if _ci():
                pytest.fail(message)
            pytest.skip(message)
        url = server.admin_url
        _shared["server"] = server
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {TEMPLATE}"))
        conn.execute(text(f"CREATE DATABASE {TEMPLATE}"))
    engine.dispose()
    yield url
    if server is not None:
        server.stop()


def start_server(purpose: str) -> PostgresServer:
    """A PostgreSQL server of the test's own, for tests that restart or stop it."""
    bindir = find_bindir()
    if bindir is None:
        message = f"no PostgreSQL server binaries for {purpose}"
        if _ci():
            pytest.fail(message)
        pytest.skip(message)
    server = PostgresServer(bindir, durable=True)
    server.start()
    return server


@pytest.fixture(scope="module")
def own_pg() -> Iterator[PostgresServer]:
    """A server for this test module alone: its tests may restart or stop it."""
    server = start_server("a server of its own")
    yield server
    server.stop()


@pytest.fixture
def own_pg_url(own_pg: PostgresServer) -> Iterator[str]:
    """A fresh database on the module's own server (started if a test stopped it)."""
    if own_pg.pg_ctl("status", check=False).returncode != 0:
        own_pg.start_again()
    name = f"o_{os.getpid()}_{next(_counter)}"
    admin = create_engine(own_pg.admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    yield make_url(own_pg.admin_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh database cloned from the (empty) template: fast to create."""
    name = f"t_{os.getpid()}_{next(_counter)}"
    admin = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}"))
    url = make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


@pytest.fixture(scope="session")
def mysql_server() -> Iterator[MariaDBServer | None]:
    """The suite's own MariaDB server (None when JOBRUNNER_TEST_MYSQL_URL names one)."""
    if os.environ.get("JOBRUNNER_TEST_MYSQL_URL"):
        yield None
        return
    found = find_server()
    if found is None:
        message = "no MariaDB server binaries (Debian's mariadb-server package) on this machine"
        if _ci():
            pytest.fail(message)
        pytest.skip(message)
    server = MariaDBServer(*found)
    try:
        server.start()
    except (subprocess.CalledProcessError, OSError) as error:
        detail = getattr(error, "stderr", b"") or b""
        message = f"cannot start MariaDB: {error} {detail.decode(errors='replace')}"
        if _ci():
            pytest.fail(message)
        pytest.skip(message)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mysql_admin_url(mysql_server: MariaDBServer | None) -> str:
    return os.environ.get("JOBRUNNER_TEST_MYSQL_URL") or mysql_server.admin_url  # type: ignore[union-attr]


@pytest.fixture
def mysql_url(mysql_admin_url: str) -> Iterator[str]:
    """A fresh database on the MariaDB server (creating one is cheap there)."""
    name = f"t_{os.getpid()}_{next(_counter)}"
    admin = create_engine(mysql_admin_url)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    url = make_url(mysql_admin_url).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.begin() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'test.db'}"


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgresql", marks=pytest.mark.postgres),
        pytest.param("mariadb", marks=pytest.mark.mysql),
    ]
)
def db_url(request: pytest.FixtureRequest) -> str:
    """Every contract test runs on the three databases."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    if request.param == "mariadb":
        return request.getfixturevalue("mysql_url")
    return request.getfixturevalue("pg_url")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def sp_url(request: pytest.FixtureRequest) -> str:
    """SQLite and PostgreSQL: for tests whose MariaDB side is covered elsewhere."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def jobs_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "jobs"
    folder.mkdir()
    return folder


@pytest.fixture
def write_job(jobs_dir: Path):
    def write(name: str, source: str) -> Path:
        path = jobs_dir / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        return path

    return write


def jobrunner_exe() -> list[str]:
    script = Path(sys.executable).parent / "jobrunner"
    if script.exists():
        return [str(script)]
    found = shutil.which("jobrunner")
    return [found] if found else [sys.executable, "-m", "jobrunner"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBRUNNER_")}
    env.update(extra)
    return env


@pytest.fixture
def cli(tmp_path: Path, jobs_dir: Path):
    """Run ``jobrunner ARGS`` as a user would: a subprocess, in tmp_path."""

    def run(
        *args: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float = 120,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*jobrunner_exe(), *args],
            cwd=cwd or tmp_path,
            env=clean_env(**(env or {})),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )

    return run


@pytest.fixture
def spawn(tmp_path: Path):
    """Start ``jobrunner ARGS`` in the background; every process is reaped."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [*jobrunner_exe(), *args],
            cwd=tmp_path,
            env=clean_env(**(env or {})),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
