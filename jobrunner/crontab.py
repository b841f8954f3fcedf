"""``jobrunner crontab``: crontab lines for the jobs that have a schedule.

Cron runs commands with a bare environment (PATH=/usr/bin:/bin, cwd $HOME),
so every line names the jobrunner executable and the config file by
absolute path; relative paths inside the config resolve against its folder.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

from jobrunner import redaction
from jobrunner.config import Config
from jobrunner.exceptions import ConfigError


def executable() -> list[str]:
    beside = Path(sys.executable).parent / "jobrunner"
    if beside.exists():
        return [str(beside.absolute())]
    found = shutil.which("jobrunner")
    if found:
        return [str(Path(found).absolute())]
    return [str(Path(sys.executable).absolute()), "-m", "jobrunner"]


def carried_options(config: Config) -> list[str]:
    """The settings given on this command line or in the environment, which cron
    would not have: carried into every line, or refused if they hold a secret."""
    carried: list[str] = []
    for key, flag in (("jobs_path", "--jobs-path"), ("database_url", "--database-url")):
        origin = config.origins.get(key, "")
        if not origin.startswith(("--", "environment variable")):
            continue
        value = str(getattr(config, key))
        if key == "database_url" and redaction.url_secrets(value):
            raise ConfigError(
                f"{origin}: the database URL holds a password, which a crontab line must not: put "
                "database_url in the config file (or the password in ~/.pgpass) instead"
            )
        carried += [flag, value]
    return carried


def lines(config: Config) -> list[str]:
    if config.config_file is None:
        raise ConfigError("no config file: schedules live in its [jobs.NAME] sections (use --config PATH)")
    config_path = config.config_file.absolute()
    extra = carried_options(config)
    out = [f"# jobrunner jobs scheduled in {config_path}"]
    scheduled = {name: s for name, s in sorted(config.job_sections.items()) if s.get("schedule")}
    missing = [name for name in scheduled if not (config.jobs_path / f"{name}.py").is_file()]
    if missing:
        names = ", ".join(f"[jobs.{name}]" for name in missing)
        raise ConfigError(
            f"{config_path}: {names} {'has a' if len(missing) == 1 else 'have'} schedule but no job "
            f"module in {config.jobs_path.absolute()} ({', '.join(f'{name}.py' for name in missing)}): "
            "cron would fail every time"
        )
    for name, section in scheduled.items():
        schedule = section["schedule"]
        if len(schedule.split()) != 5 and not schedule.startswith("@"):
            raise ConfigError(f"{config_path}: [jobs.{name}] schedule {schedule!r} is not a crontab schedule")
        resume = ["--resume"] if section.get("resume", config.resume) else []
        command = [*executable(), "run", name, "--config", str(config_path), *extra, *resume, "--quiet"]
        # cron turns an unescaped % into a newline
        out.append(f"{schedule} {shlex.join(command)}".replace("%", "\\%"))
    return out
