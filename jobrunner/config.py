"""The run's configuration: one frozen, validated value.

Built once, in this order, each layer overriding the one before:
defaults, the config file's top level, the file's ``[jobs.NAME]`` section,
environment variables, command-line flags. Relative paths from the file (and
the defaults) resolve against the file's folder, because cron starts jobs from
$HOME; relative paths from flags and environment resolve against the current
folder, as a user typing them expects.

This module imports neither SQLAlchemy nor rich: ``jobrunner list`` and
``--help`` must start fast.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jobrunner.exceptions import ConfigError

DEFAULT_CONFIG_NAME = "jobrunner.toml"
DEFAULT_DATABASE_URL = "sqlite:///jobrunner.db"
LOCK_MODES = ("row", "advisory")

ENV_VARS = {
    "database_url": "JOBRUNNER_DATABASE_URL",
    "workers": "JOBRUNNER_WORKERS",
    "jobs_path": "JOBRUNNER_JOBS_PATH",
}
CONFIG_ENV = "JOBRUNNER_CONFIG"


def _int(minimum: int):
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


def _float(minimum: float, *, strict: bool = False):
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


def _lock_mode(value: Any) -> str:
    if value not in LOCK_MODES:
        raise ValueError(f"expected one of {', '.join(LOCK_MODES)}, got {value!r}")
    return value


# key -> (validator, where it may appear: "top", "job" or "both")
SETTINGS: dict[str, tuple[Any, str]] = {
    "database_url": (_str, "top"),
    "jobs_path": (_str, "top"),
    "workers": (_int(1), "both"),
    "no_lock": (_bool, "both"),
    "lock": (_lock_mode, "both"),
    "wait_lock": (_float(0), "both"),
    "heartbeat": (_float(0, strict=True), "both"),
    "retries": (_int(0), "both"),
    "max_failures": (_int(0), "both"),
    "shutdown_timeout": (_float(0), "both"),
    "metrics_file": (_str, "both"),
    "progress_interval": (_float(0, strict=True), "both"),
    "log_file": (_str, "both"),
    "schedule": (_str, "job"),
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a command needs, validated. Build it with :func:`load`."""

    database_url: str = DEFAULT_DATABASE_URL
    jobs_path: Path = Path("jobs")
    config_file: Path | None = None
    job: str | None = None
    workers: int = 4
    no_lock: bool = False
    lock: str = "row"
    wait_lock: float = 0.0
    heartbeat: float = 1.0
    retries: int = 3
    max_failures: int | None = None
    shutdown_timeout: float = 30.0
    metrics_file: str | None = None
    progress_interval: float = 30.0
    log_file: str | None = None
    schedule: str | None = None
    # per-invocation flags, never read from a file
    params: Mapping[str, str] = dataclasses.field(default_factory=dict)
    dry_run: bool = False
    resume: bool = False
    json: bool = False
    debug: bool = False
    quiet: bool = False
    verbose: int = 0
    # every [jobs.NAME] section, for `jobrunner crontab` and `status`
    job_sections: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def database_password(self) -> str | None:
        match = _PASSWORD_IN_URL.match(self.database_url)
        if match is None:
            return None
        secret = self.database_url[match.end("head") : match.end() - 1]
        return secret or None

    @property
    def metrics_path(self) -> Path | None:
        if not self.metrics_file:
            return None
        return Path(self.metrics_file.replace("{job}", self.job or "jobrunner"))


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
    origin: dict[str, Path] = {"database_url": base, "jobs_path": base}
    values.update(file_values)
    if job is not None and job in sections:
        values.update(sections[job])

    for key, var in ENV_VARS.items():
        raw = environ.get(var)
        if raw is not None and raw != "":
            values[key] = _validate(key, raw, f"environment variable {var}")
            origin[key] = cwd

    for key, value in flags.items():
        if key in SETTINGS:
            values[key] = _validate(key, value, "--" + key.replace("_", "-"))
            origin[key] = cwd
        else:
            values[key] = value

    values["jobs_path"] = _resolve_path(values["jobs_path"], origin["jobs_path"])
    values["database_url"] = resolve_database_url(values["database_url"], origin["database_url"])
    return Config(config_file=config_file, job=job, job_sections=sections, **values)


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
        raise ConfigError(f"{where}: {redact_url(str(exc))}") from None


def _resolve_path(value: str | Path, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


_SCHEME = re.compile(r"^(?P<dialect>[A-Za-z0-9_]+)(\+(?P<driver>[A-Za-z0-9_]+))?://")


def dialect_of(url: str) -> str:
    match = _SCHEME.match(url)
    return match.group("dialect").lower() if match else ""


def resolve_database_url(url: str, base: Path) -> str:
    """Check the URL's kind and make a relative SQLite file absolute against ``base``."""
    dialect = dialect_of(url)
    if dialect not in ("sqlite", "postgresql", "postgres"):
        raise ConfigError(
            f"database URL {redact_url(url)!r} is not supported: "
            "use sqlite:///PATH or postgresql+psycopg2://USER@HOST/DB"
        )
    if dialect == "postgres":
        raise ConfigError(f"database URL {redact_url(url)!r}: write postgresql://, not postgres://")
    if dialect != "sqlite":
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the driver we
        # ship (and test) is psycopg2.
        if _SCHEME.match(url).group("driver") is None:  # type: ignore[union-attr]
            return "postgresql+psycopg2://" + url.partition("://")[2]
        return url
    prefix, _, rest = url.partition("://")
    path, sep, query = rest.partition("?")
    if path in ("", "/", "/:memory:") or path.startswith("/file::memory:") or "mode=memory" in query:
        raise ConfigError(
            f"database URL {url!r} is an in-memory SQLite database, which worker "
            "threads cannot share: use a file, e.g. sqlite:///jobrunner.db"
        )
    if not path.startswith("/"):
        raise ConfigError(f"database URL {url!r} is malformed: expected sqlite:///PATH")
    file_part = path[1:]
    if file_part.startswith("file:"):
        return url  # a URI filename: taken as written
    resolved = _resolve_path(file_part, base)
    return f"{prefix}:///{resolved}{sep}{query}"


# Greedy up to the last "@" before the path: an unencoded "@" in a password
# must not leave its tail visible.
_PASSWORD_IN_URL = re.compile(r"(?P<head>[A-Za-z0-9+_.-]+://[^/@:\s]*:)[^/\s]*@")
_PASSWORD_PARAM = re.compile(r"(?i)(password=)[^&\s]*")


def redact_url(text: str) -> str:
    """Hide any password in a database URL inside ``text``."""
    text = _PASSWORD_IN_URL.sub(lambda m: m.group("head") + "***@", text)
    return _PASSWORD_PARAM.sub(r"\1***", text)
