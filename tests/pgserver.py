"""A throwaway PostgreSQL server for the test suite (and the benchmarks).

initdb refuses to run as root, so as root the server runs as the
``postgres`` user, on a data folder that user owns.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def find_bindir() -> Path | None:
    candidates = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(Path(out.stdout.strip()))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """``durable=False`` trades durability for speed (fsync and synchronous_commit
    off); a server that a test crashes (stop -m immediate) must be durable, or
    commits it acknowledged vanish with the crash."""

    def __init__(self, bindir: Path, *, durable: bool = False) -> None:
        self.bindir = bindir
        self.durable = durable
        self.root = Path(tempfile.mkdtemp(prefix="jobrunner-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self.port = _free_port()
        self.as_root = os.geteuid() == 0

    def _cmd(self, *args: str) -> list[str]:
        return (["runuser", "-u", "postgres", "--"] if self.as_root else []) + list(args)

    def start(self) -> None:
        self.sockets.mkdir(parents=True)
        if self.as_root:
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(self.sockets, "postgres", "postgres")
        subprocess.run(
            self._cmd(
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ),
            check=True,
            capture_output=True,
        )
        # Members of password_users must give a password over TCP (the tests of
        # password redaction need a real authentication failure); everyone
        # else is trusted, as initdb set up.
        hba = self.data / "pg_hba.conf"
        hba.write_text("host all +password_users 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        options = " ".join(
            [
                f"-p {self.port}",
                f"-k {self.sockets}",
                "-c listen_addresses=127.0.0.1",
                "-c max_connections=400",
                f"-c fsync={'on' if self.durable else 'off'}",
                f"-c synchronous_commit={'on' if self.durable else 'off'}",
                f"-c full_page_writes={'on' if self.durable else 'off'}",
                "-c shared_buffers=64MB",
            ]
        )
        self.options = options
        self.pg_ctl("-o", options, "-w", "-t", "60", "start")

        self._psql("CREATE ROLE password_users NOLOGIN")

    def _psql(self, sql: str) -> None:
        subprocess.run(
            [
                str(self.bindir / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-qc",
                sql,
            ],
            check=True,
            capture_output=True,
        )

    def pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """pg_ctl on this server (restart, stop, start), as its owner. The server's
        output goes to its log file: a pipe would keep subprocess.run waiting."""
        return subprocess.run(
            self._cmd(
                str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), *args
            ),
            check=check,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
        )

    def start_again(self) -> None:
        """Start a server that a test stopped, on the same port and options."""
        self.pg_ctl("-o", self.options, "-w", "-t", "60", "start")

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        subprocess.run(
            self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"),
            capture_output=True,
        )
        shutil.rmtree(self.root, ignore_errors=True)
