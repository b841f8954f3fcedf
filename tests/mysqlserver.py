"""A throwaway MariaDB server for the test suite (and the benchmarks), from
Debian's mariadb-server package: a data folder in a temporary directory, its
own socket and port. As root, the server runs as the ``mysql`` user."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USER = "jobrunner"


def find_server() -> tuple[Path, Path] | None:
    """(server binary, install-db script), or None if the package is missing."""
    for server in ("mariadbd", "mysqld"):
        for folder in ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"):
            binary = Path(folder) / server
            installer = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
            if binary.exists() and installer:
                return binary, Path(installer)
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MariaDBServer:
    def __init__(self, binary: Path, installer: Path) -> None:
        self.binary = binary
        self.installer = installer
        self.root = Path(tempfile.mkdtemp(prefix="jobrunner-mariadb-"))
        self.data = self.root / "data"
        self.socket = self.root / "mysqld.sock"
        self.port = _free_port()
        self.as_root = os.geteuid() == 0
        self.process: subprocess.Popen | None = None

    def _options(self) -> list[str]:
        return [
            "--no-defaults",
            f"--datadir={self.data}",
            f"--socket={self.socket}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--pid-file={self.root / 'mysqld.pid'}",
            f"--log-error={self.root / 'error.log'}",
            "--skip-log-bin",
            "--skip-name-resolve",
            "--max-connections=400",
            "--innodb-buffer-pool-size=64M",
            "--innodb-log-file-size=16M",
            # Fast, not durable: a test server (like the PostgreSQL one with fsync off).
            "--innodb-flush-log-at-trx-commit=0",
            "--innodb-doublewrite=0",
            # Off by default in MariaDB; on here so tests can read the connections' names.
            "--performance-schema=ON",
            *(["--user=mysql"] if self.as_root else []),
        ]

    def start(self) -> None:
        if self.as_root:
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, "mysql", "mysql")
        subprocess.run(
            [
                str(self.installer),
                "--no-defaults",
                f"--datadir={self.data}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                *(["--user=mysql"] if self.as_root else []),
            ],
            check=True,
            capture_output=True,
        )
        self.process = subprocess.Popen(
            [str(self.binary), *self._options()],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.root / "error.log").read_text(errors="replace")[-2000:]
                raise OSError(f"MariaDB did not start: {log}")
            time.sleep(0.1)
        self._sql(
            f"CREATE USER IF NOT EXISTS '{USER}'@'%'; GRANT ALL ON *.* TO '{USER}'@'%' WITH GRANT OPTION; "
            "FLUSH PRIVILEGES;"
        )

    def _sql(self, sql: str) -> None:
        import pymysql

        deadline = time.monotonic() + 30
        while True:
            try:
                conn = pymysql.connect(unix_socket=str(self.socket), user="root", autocommit=True)
                break
            except pymysql.err.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        try:
            with conn.cursor() as cursor:
                for statement in filter(None, (s.strip() for s in sql.split(";"))):
                    cursor.execute(statement)
        finally:
            conn.close()

    @property
    def admin_url(self) -> str:
        return f"mysql+pymysql://{USER}@127.0.0.1:{self.port}/mysql"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)
        shutil.rmtree(self.root, ignore_errors=True)
