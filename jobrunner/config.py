"""The run's configuration: one frozen, validated value.

Built once, in this order, each layer overriding the one before:
defaults, the config file's top level, the job module's own constants
(``BATCH_SIZE``, ``ISOLATION``; applied once the job is loaded), the file's
``[jobs.NAME]`` section, environment variables, command-line flags. Relative
paths from the file (and the defaults) resolve against the file's folder,
because cron starts jobs from $HOME; relative paths from flags and
environment resolve against the current folder, as a user typing them
expects. Every value remembers where it came from, so an error can say.

This module imports neither SQLAlchemy nor rich: ``jobrunner list`` and
``--help`` must start fast.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from jobrunner import redaction
from jobrunner.exceptions import ConfigError

DEFAULT_CONFIG_NAME = "jobrunner.toml"
DEFAULT_DATABASE_URL = "sqlite:///jobrunner.db"
LOCK_MODES = ("row", "advisory")
ISOLATION_LEVELS = ("read_committed", "repeatable_read", "serializable")
# Settings a job module may default with a module-level constant.
JOB_MODULE_DEFAULTS = {"BATCH_SIZE": "batch_size", "ISOLATION": "isolation", "CONCURRENCY": "concurrency"}
# Settings holding a path: from the config file they resolve against its folder.
PATH_SETTINGS = ("jobs_path", "metrics_file", "log_file")

ENV_VARS = {
    "database_url": "JOBRUNNER_DATABASE_URL",
    "workers": "JOBRUNNER_WORKERS",
    "jobs_path": "JOBRUNNER_JOBS_PATH",
    "batch_size": "JOBRUNNER_BATCH_SIZE",
}
CONFIG_ENV = "JOBRUNNER_CONFIG"


def _int(minimum: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError("expected a whole number")
        if isinstance(value, str):
            value = value.strip()
            if not re.fullmatch(r"[+-]?\d+", value):
                raise ValueError(f"expected a whole number, got {value!r}")
        if not isinstance(value, (int, str)):
            raise ValueError(f"expected a whole number, got {value!r}")
        number = int(value)
        if number < minimum:
            raise ValueError(f"must be at least {minimum}, got {number}")
        return number

    return check


def _float(minimum: float, *, strict: bool = False) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite number, got {value!r}")
        if number < minimum or (strict and number == minimum):
            bound = "more than" if strict else "at least"
            raise ValueError(f"must be {bound} {minimum:g}, got {number:g}")
        return number

    return check


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return value

    return check


# key -> (validator, where it may appear: "top", "job" or "both")
SETTINGS: dict[str, tuple[Any, str]] = {
    "database_url": (_str, "top"),
    "jobs_path": (_str, "top"),
    "workers": (_int(1), "both"),
    "concurrency": (_int(1), "both"),
    "no_lock": (_bool, "both"),
    "lock": (_choice(LOCK_MODES), "both"),
    "isolation": (_choice(ISOLATION_LEVELS), "both"),
    "batch_size": (_int(1), "both"),
    "fixed_batch_size": (_bool, "both"),
    "processes": (_int(1), "both"),
    "join": (_bool, "both"),
    "outage_timeout": (_float(0), "both"),
    "wait_lock": (_float(0), "both"),
    "heartbeat": (_float(0, strict=True), "both"),
    "retries": (_int(0), "both"),
    "max_failures": (_int(0), "both"),
    "shutdown_timeout": (_float(0), "both"),
    "metrics_file": (_str, "both"),
    "progress_interval": (_float(0, strict=True), "both"),
    "log_file": (_str, "both"),
    "schedule": (_str, "job"),
    "resume": (_bool, "both"),
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a command needs, validated. Build it with :func:`load`."""

    database_url: str = DEFAULT_DATABASE_URL
    jobs_path: Path = Path("jobs")
    config_file: Path | None = None
    job: str | None = None
    workers: int = 4
    # An async job's items in flight at once, those awaiting prepare() included;
    # workers stays the number of item transactions (connections) at once.
    concurrency: int = 100
    batch_size: int = 1
    fixed_batch_size: bool = False  # True: chunks stay at batch_size under conflicts
    processes: int = 1  # more than 1, or join: a distributed run (PostgreSQL)
    join: bool = False
    isolation: str | None = None  # None: the database's safe default (see db.py)
    no_lock: bool = False
    lock: str = "row"
    wait_lock: float = 0.0
    heartbeat: float = 1.0
    retries: int = 3
    max_failures: int | None = None
    shutdown_timeout: float = 30.0
    outage_timeout: float = 60.0
    metrics_file: str | None = None
    progress_interval: float = 30.0
    log_file: str | None = None
    schedule: str | None = None
    # A crashed run is taken up where it stopped (needs item_key); with no
    # crashed run to resume, a start runs normally.
    resume: bool = False
    # per-invocation flags, never read from a file
    params: Mapping[str, str] = dataclasses.field(default_factory=dict)
    dry_run: bool = False
    json: bool = False
    debug: bool = False
    quiet: bool = False
    verbose: int = 0
    # every [jobs.NAME] section, for `jobrunner crontab` and `status`
    job_sections: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    # what the operator should hear before anything runs (a readable password)
    warnings: tuple[str, ...] = ()
    # where each setting came from ("--workers", "environment variable ...",
    # "<file>: key 'workers'"), for error messages; absent means the default
    origins: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def metrics_path(self) -> Path | None:
        if not self.metrics_file:
            return None
        return Path(self.metrics_file.replace("{job}", self.job or "jobrunner"))

    @property
    def distributed(self) -> bool:
        return self.processes > 1 or self.join

    @property
    def items_in_flight(self) -> int:
        """An async run's bound on items in flight: ``concurrency`` where it
        was set, else the default or what the workers' chunks hold, whichever
        is more. Chunks are in flight whole, about concurrency / batch_size of
        them, and a default below workers x batch_size left workers idle that
        nobody had asked to idle (-w 4 -b 1000 ran one chunk at a time)."""
        if "concurrency" in self.origins:
            return self.concurrency
        return max(self.concurrency, self.workers * self.batch_size)

    def origin(self, key: str) -> str:
        """Where ``key`` was set, for an error message."""
        return self.origins.get(key, f"the default {key}")

    def with_job_defaults(self, module_values: Mapping[str, Any], where: str) -> Config:
        """Apply a job module's own defaults (``BATCH_SIZE = 100``): they beat
        the file's top level and the built-in defaults, and lose to the job's
        [jobs.NAME] section, the environment and flags."""
        changes: dict[str, Any] = {}
        origins = dict(self.origins)
        for key, value in module_values.items():
            if _rank(self.origins.get(key)) >= SECTION_RANK:
                continue
            changes[key] = _validate(key, value, f"{where}: {key.upper()}")
            origins[key] = f"{where}: {key.upper()}"
        if not changes:
            return self
        return dataclasses.replace(self, **changes, origins=origins)


def _rank(origin: str | None) -> int:
    """How strong a setting's origin is: default < file < section < env < flag."""
    if origin is None:
        return 0
    if origin.startswith("--"):
        return 4
    if origin.startswith("environment variable"):
        return 3
    if "[jobs." in origin:
        return SECTION_RANK
    return 1


SECTION_RANK = 2


def load(
    flags: Mapping[str, Any] | None = None,
    *,
    job: str | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Config:
    """Build the configuration for one command (and one job, for ``run``).

    ``flags`` holds command-line values; ``None`` means "not given".
    """
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    environ = os.environ if environ is None else environ
    cwd = (cwd or Path.cwd()).absolute()

    config_file, explicit = _find_config_file(flags.pop("config", None), environ, cwd)
    file_values: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    base = cwd
    if config_file is not None:
        file_values, sections = _read_config_file(config_file, explicit)
        base = config_file.parent

    values: dict[str, Any] = {"database_url": DEFAULT_DATABASE_URL, "jobs_path": "jobs"}
    # A path resolves against the folder of whatever set it.
    folder: dict[str, Path] = dict.fromkeys(("database_url", *PATH_SETTINGS), base)
    origins: dict[str, str] = {}
    for key, value in file_values.items():
        values[key] = value
        origins[key] = f"{config_file}: key {key!r}"
    if job is not None and job in sections:
        for key, value in sections[job].items():
            values[key] = value
            origins[key] = f"{config_file}: [jobs.{job}] key {key!r}"

    for key, var in ENV_VARS.items():
        raw = environ.get(var)
        if raw is not None and raw != "":
            origins[key] = f"environment variable {var}"
            values[key] = _validate(key, raw, origins[key])
            folder[key] = cwd

    for key, value in flags.items():
        if key in SETTINGS:
            origins[key] = "--" + key.replace("_", "-")
            values[key] = _validate(key, value, origins[key])
            folder[key] = cwd
        else:
            values[key] = value

    for key in PATH_SETTINGS:
        if values.get(key) is not None:
            values[key] = _resolve_path(values[key], folder[key])
            if key != "jobs_path":
                values[key] = str(values[key])
    url = values["database_url"]
    redaction.register(url)
    values["database_url"] = resolve_database_url(url, folder["database_url"], origins.get("database_url"))
    redaction.register(values["database_url"])
    warnings = _exposed_password(config_file, url, origins.get("database_url", ""))
    return Config(
        config_file=config_file, job=job, job_sections=sections, origins=origins, warnings=warnings, **values
    )


def _exposed_password(config_file: Path | None, url: str, origin: str) -> tuple[str, ...]:
    """libpq ignores a ~/.pgpass that group or others can read, and ssh refuses
    such a key: a config file that hands out the database's password is worth
    a line. Read from the mode bits (as root, os.access says yes to everything)."""
    if config_file is None or not origin.startswith(str(config_file)) or not redaction.url_secrets(url):
        return ()
    try:
        mode = config_file.stat().st_mode
    except OSError:
        return ()
    if not mode & (stat.S_IRWXG | stat.S_IRWXO):
        return ()
    return (
        f"{config_file} holds the database password and is readable by "
        f"{'group and others' if mode & stat.S_IRWXO else 'its group'} (mode {stat.S_IMODE(mode):o}): "
        f"chmod 600 {config_file}",
    )


def _find_config_file(flag: str | None, environ: Mapping[str, str], cwd: Path) -> tuple[Path | None, bool]:
    given = flag or environ.get(CONFIG_ENV) or None
    if given:
        path = Path(given).expanduser()
        return (path if path.is_absolute() else cwd / path), True
    default = cwd / DEFAULT_CONFIG_NAME
    return (default, False) if default.is_file() else (None, False)


def _read_config_file(path: Path, explicit: bool) -> tuple[dict[str, Any], dict[str, dict]]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None

    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        where = f"{path}: key {key!r}"
        if key == "jobs":
            if not isinstance(value, dict):
                raise ConfigError(f"{where} must be a table of [jobs.NAME] sections")
            for name, section in value.items():
                if not isinstance(section, dict):
                    raise ConfigError(f"{path}: [jobs.{name}] must be a table")
                sections[name] = {
                    k: _check_key(k, v, "job", f"{path}: [jobs.{name}] key {k!r}") for k, v in section.items()
                }
            continue
        top[key] = _check_key(key, value, "top", where)
    return top, sections


def _check_key(key: str, value: Any, scope: str, where: str) -> Any:
    spec = SETTINGS.get(key)
    if spec is None or spec[1] not in (scope, "both"):
        known = sorted(k for k, (_, s) in SETTINGS.items() if s in (scope, "both"))
        raise ConfigError(f"{where} is unknown (known keys: {', '.join(known)})")
    return _validate(key, value, where)


def _validate(key: str, value: Any, where: str) -> Any:
    try:
        return SETTINGS[key][0](value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {redaction.redact(str(exc))}") from None


def _resolve_path(value: str | Path, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


_SCHEME = re.compile(r"^(?P<dialect>[A-Za-z0-9_]+)(\+(?P<driver>[A-Za-z0-9_]+))?://")
SERVER_DIALECTS = {"postgresql": "psycopg2", "mysql": "pymysql", "mariadb": "pymysql"}


def dialect_of(url: str) -> str:
    match = _SCHEME.match(url)
    return match.group("dialect").lower() if match else ""


def resolve_database_url(url: str, base: Path, origin: str | None = None) -> str:
    """Check the URL and make a relative SQLite file absolute against ``base``."""
    shown = redaction.redact(url)
    where = f" (from {origin})" if origin else ""
    dialect = dialect_of(url)
    if dialect == "postgres":
        raise ConfigError(f"database URL {shown!r}{where}: write postgresql://, not postgres://")
    if dialect != "sqlite" and dialect not in SERVER_DIALECTS:
        raise ConfigError(
            f"database URL {shown!r}{where} is not supported: "
            "use sqlite:///PATH, postgresql+psycopg2://USER@HOST/DB or mysql+pymysql://USER@HOST/DB"
        )
    if dialect != "sqlite":
        _check_server_url(url, f"database URL {shown!r}{where}")
        match = _SCHEME.match(url)
        if match is not None and match.group("driver") is None:
            # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, and mysql://
            # to mysqlclient; the drivers we ship (and test) are psycopg2 and PyMySQL.
            return f"{dialect}+{SERVER_DIALECTS[dialect]}://" + url.partition("://")[2]
        return url
    prefix, _, rest = url.partition("://")
    path, sep, query = rest.partition("?")
    if path in ("", "/", "/:memory:") or path.startswith("/file::memory:") or "mode=memory" in query:
        raise ConfigError(
            f"database URL {shown!r}{where} is an in-memory SQLite database, which worker "
            "threads cannot share: use a file, e.g. sqlite:///jobrunner.db"
        )
    if not path.startswith("/"):
        raise ConfigError(f"database URL {shown!r}{where} is malformed: expected sqlite:///PATH")
    file_part = path[1:]
    if file_part.startswith("file:"):
        return url  # a URI filename: taken as written
    resolved = _resolve_path(file_part, base)
    return f"{prefix}:///{resolved}{sep}{query}"


def _check_server_url(url: str, shown: str) -> None:
    """What SQLAlchemy's parser would get wrong or raise on, as one line."""
    rest = url.partition("://")[2].split("?", 1)[0]
    userinfo, at, hostpart = rest.rpartition("@")
    if at and "@" in userinfo:
        raise ConfigError(f"{shown} is malformed: write an '@' inside the user or password as %40")
    netloc = hostpart.split("/", 1)[0]
    host, colon, port = netloc.rpartition(":") if not netloc.endswith("]") else (netloc, "", "")
    if colon and not (port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"{shown} is malformed: port {port!r} is not a number from 1 to 65535")
    if colon and not host:
        raise ConfigError(f"{shown} is malformed: it names a port but no host")


def redact_url(text: str) -> str:
    """Hide any password in a database URL inside ``text``."""
    return redaction.redact(text)
