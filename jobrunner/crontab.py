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


def lines(config: Config) -> list[str]:
    if config.config_file is None:
        raise ConfigError("no config file: schedules live in its [jobs.NAME] sections (use --config PATH)")
    config_path = config.config_file.absolute()
    out = [f"# jobrunner jobs scheduled in {config_path}"]
    for name, section in sorted(config.job_sections.items()):
        schedule = section.get("schedule")
        if not schedule:
            continue
        if len(schedule.split()) != 5 and not schedule.startswith("@"):
            raise ConfigError(f"{config_path}: [jobs.{name}] schedule {schedule!r} is not a crontab schedule")
        command = [*executable(), "run", name, "--config", str(config_path), "--quiet"]
        # cron turns an unescaped % into a newline
        out.append(f"{schedule} {shlex.join(command)}".replace("%", "\\%"))
    return out
