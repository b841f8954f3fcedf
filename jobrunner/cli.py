"""The ``jobrunner`` command. Each command parses its options, builds the
config, and calls one library function; formatting lives in ``report.py``.
Errors reach the operator through one place, :meth:`JobrunnerGroup.main`."""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from jobrunner import __version__, redaction
from jobrunner import config as configmod
from jobrunner.exceptions import EX_SIGINT, EX_SOFTWARE, EX_USAGE, exit_for


class JobrunnerGroup(click.Group):
    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:  # type: ignore[override]
        # Everything printed passes a redactor: a password that reached a
        # message by a path nobody foresaw is still masked.
        sys.stdout = redaction.RedactingStream(sys.stdout)
        sys.stderr = redaction.RedactingStream(sys.stderr)
        meta: dict[str, Any] = _scan(sys.argv[1:] if args is None else list(args))
        try:
            code = super().main(args=args, prog_name=prog_name, standalone_mode=False, obj=meta, **extra)
        except click.UsageError as error:
            command = error.ctx.command_path if error.ctx else "jobrunner"
            _error(f"{error.format_message()} (see '{command} --help')", meta)
            code = EX_USAGE
        except click.ClickException as error:
            _error(error.format_message(), meta, error.exit_code)
            code = error.exit_code
        except click.Abort:
            code = EX_SIGINT
        except KeyboardInterrupt:
            code = EX_SIGINT
        except Exception as error:  # noqa: BLE001 - a JobrunnerError or a bug: one line unless --debug
            if meta.get("debug"):
                traceback.print_exc()
            code, message = exit_for(error)
            _error(message, meta, code)
            if code == EX_SOFTWARE:
                # A bug may leave threads that never end (a worker loop, a pool):
                # end now, so cron gets the exit code and the database rolls back
                # whatever they hold.
                _leave(code)
        sys.exit(code if isinstance(code, int) else 0)


def _leave(code: int) -> None:
    import logging
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def _scan(args: list[str]) -> dict[str, Any]:
    """What the error handler needs even when parsing fails before it reaches
    the flag: --json anywhere on the line (before ``--``) promises one JSON
    object on stdout, and the job is the word after ``run``."""
    words = args[: args.index("--")] if "--" in args else args
    meta: dict[str, Any] = {"json": "--json" in words}
    if "run" in words:
        after = words[words.index("run") + 1 :]
        if after and not after[0].startswith("-"):
            meta["job"] = after[0]
    return meta


def _error(message: str, meta: dict[str, Any], code: int = EX_USAGE) -> None:
    from jobrunner import report

    report.print_error(message)
    report.log_error(f"{message} (exit {code})")
    if meta.get("json"):
        report.print_error_json(message, code, meta.get("job"))


def _remember(name: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """An eager callback that records a flag for the error handler, which
    runs after click has thrown the parsed values away."""

    def callback(ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        ctx.find_root().obj[name] = value
        return value

    return callback


def json_option(help_text: str) -> Callable[..., Any]:
    return click.option(
        "--json", "json_output", is_flag=True, is_eager=True, callback=_remember("json"), help=help_text
    )


def common_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--config, --database-url, --jobs-path and --debug, on every command."""

    @click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False),
        help="Config file (default: $JOBRUNNER_CONFIG, else ./jobrunner.toml if present).",
    )
    @click.option(
        "--database-url",
        metavar="URL",
        help="SQLAlchemy URL: sqlite:///PATH, postgresql+psycopg2://USER@HOST/DB or "
        "mysql+pymysql://USER@HOST/DB (default: $JOBRUNNER_DATABASE_URL, else sqlite:///jobrunner.db).",
    )
    @click.option(
        "--jobs-path",
        metavar="DIR",
        help="Folder holding the job modules (default: $JOBRUNNER_JOBS_PATH, else ./jobs).",
    )
    @click.option(
        "--debug",
        is_flag=True,
        callback=_remember("debug"),
        expose_value=True,
        is_eager=True,
        help="Show Python tracebacks and debug logging.",
    )
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return command(*args, **kwargs)

    return wrapper


def load_config(ctx: click.Context, job: str | None = None, **flags: Any) -> configmod.Config:
    flags["config"] = flags.pop("config_file", None)
    ctx.find_root().obj["job"] = job
    return configmod.load(flags, job=job)


def _parse_params(values: tuple[str, ...]) -> dict[str, str]:
    params = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {value!r}", param_hint="'--param'")
        params[key.strip()] = text
    return params


@click.group(cls=JobrunnerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="jobrunner")
def cli() -> None:
    """Run batch jobs against a SQL database: concurrently, safely under cron.

    A job is a Python module in the jobs folder defining items(ctx, session)
    and process(ctx, session, item). Exit codes: 0 all items succeeded, 1 some
    failed, 2 usage or configuration error, 69 database unavailable or lock
    lost, 70 internal error (a bug in jobrunner), 75 job already running,
    130/143 interrupted by SIGINT/SIGTERM.
    """


@cli.command("run")
@click.argument("job")
@common_options
@click.option(
    "-w",
    "--workers",
    type=click.IntRange(min=1),
    help="Worker threads, each with its own session (default 4).",
)
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(min=1),
    help="An async job's items in flight at once, awaiting prepare() included (default 100, or "
    "workers x batch size if more; a job may set CONCURRENCY). --workers stays the number of "
    "transactions at once.",
)
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="Passed to the job as ctx.params (repeatable).",
)
@click.option(
    "-b",
    "--batch-size",
    type=click.IntRange(min=1),
    help="Items per transaction, at most (default 1; a job may set BATCH_SIZE). A failed batch "
    "isolates its bad items by halves; under conflicts the batch shrinks, and grows back.",
)
@click.option(
    "--fixed-batch-size",
    is_flag=True,
    default=None,
    help="Keep every batch at --batch-size, even under conflicts (and, on PostgreSQL, "
    "the server's lock waits: an adapting batch waits at most 100 ms for a lock).",
)
@click.option(
    "-P",
    "--processes",
    type=click.IntRange(min=1),
    help="Worker processes on this host, each with --workers threads (PostgreSQL; default 1).",
)
@click.option(
    "--join",
    is_flag=True,
    default=None,
    help="Help the run of JOB in progress (if it accepts helpers), else start one that does.",
)
@click.option(
    "--isolation",
    type=click.Choice(configmod.ISOLATION_LEVELS),
    help="Isolation level of item transactions (default: repeatable_read on PostgreSQL; "
    "SQLite is always serializable).",
)
@click.option(
    "--dry-run", is_flag=True, help="Run everything in one transaction, roll it back, report changes."
)
@json_option("Print one JSON summary on stdout (even on errors); human output goes to stderr.")
@click.option(
    "--no-lock",
    is_flag=True,
    default=None,
    help="Do not take the job's lock (for jobs safe to run concurrently).",
)
@click.option(
    "--wait-lock",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Wait up to SECONDS for a running copy to finish (default 0).",
)
@click.option(
    "--heartbeat",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="How often the lock is checked (default 1).",
)
@click.option(
    "--retries", type=click.IntRange(min=0), help="Retries of transient database errors per item (default 3)."
)
@click.option("--max-failures", type=click.IntRange(min=0), help="Abort once more than N items have failed.")
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="On SIGTERM/SIGINT, how long in-flight items may finish (default 30).",
)
@click.option(
    "--outage-timeout",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="How long to wait for a database that went away mid-run before stopping with 69 (default 60).",
)
@click.option(
    "--resume",
    is_flag=True,
    default=None,
    help="Skip the items an unfinished previous run committed (needs item_key; config: resume = true).",
)
@click.option(
    "-q", "--quiet", is_flag=True, help="Print nothing on success (for cron); errors still go to stderr."
)
@click.option("-v", "--verbose", count=True, help="More detail (repeat for more).")
@click.option(
    "--log-file", type=click.Path(dir_okay=False), help="Append the log, with tracebacks, to this file."
)
@click.option(
    "--metrics-file",
    metavar="PATH",
    help="Write Prometheus textfile metrics here ({job} is replaced by the job's name).",
)
@click.option(
    "--progress-interval",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Seconds between progress lines when not on a terminal (default 30).",
)
@click.pass_context
def run_command(
    ctx: click.Context, job: str, params: tuple[str, ...], json_output: bool, **flags: Any
) -> int:
    """Run JOB (the module JOBS_PATH/JOB.py) over all its items."""
    from jobrunner import jobs, report, runner

    jobs.check_name(job)
    config = load_config(ctx, job, params=_parse_params(params), json=json_output, **flags)
    report.setup_logging(config)
    reporter = report.make_reporter(config)
    for warning in config.warnings:
        reporter.notice(warning)
        if config.quiet:  # cron mails stderr: a secret out in the open is worth it
            report.print_error(warning, prefix="warning")
    try:
        result = runner.run(config, reporter)
    except Exception as error:
        _failed_start_metrics(config, job, exit_for(error)[0])
        raise
    return result.exit_code


def _failed_start_metrics(config: configmod.Config, job: str, code: int) -> None:
    """A start that ended before its run still counts for monitoring."""
    path = config.metrics_path
    if path is None:
        return
    from jobrunner import metrics

    try:
        metrics.failed_start(path, job, code)
    except OSError:
        pass  # the error that ended the start is the one to report


@cli.command("list")
@common_options
@json_option("Print a JSON list.")
@click.pass_context
def list_command(ctx: click.Context, json_output: bool, **flags: Any) -> int:
    """List the jobs in the jobs folder with the first line of each docstring."""
    from jobrunner import jobs, report

    config = load_config(ctx, **flags)
    report.print_jobs(jobs.discover(config.jobs_path), json_output=json_output)
    return 0


@cli.command("status")
@common_options
@json_option("Print a JSON list.")
@click.pass_context
def status_command(ctx: click.Context, json_output: bool, **flags: Any) -> int:
    """Show, for each job, whether it is running now, where, and under which lock."""
    from jobrunner import report, status

    config = load_config(ctx, **flags)
    report.print_status(status.job_status(config), json_output=json_output)
    return 0


@cli.command("history")
@click.argument("job", required=False)
@common_options
@click.option(
    "--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Show at most N runs."
)
@json_option("Print a JSON list of runs.")
@click.option(
    "--purge-before",
    type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"]),
    help="Delete finished runs started before this local date or time, with their resume keys.",
)
@click.pass_context
def history_command(
    ctx: click.Context, job: str | None, limit: int, json_output: bool, purge_before: Any, **flags: Any
) -> int:
    """Show past runs, newest first (of JOB, or of every job)."""
    from jobrunner import history, jobs, report

    if job is not None:
        jobs.check_name(job)
    config = load_config(ctx, job, **flags)
    if purge_before is not None:
        report.print_purge(*history.purge_before(config, purge_before, job), json_output=json_output)
    else:
        report.print_history(history.show(config, job, limit), json_output=json_output)
    return 0


@cli.command("crontab")
@common_options
@click.pass_context
def crontab_command(ctx: click.Context, **flags: Any) -> int:
    """Print a crontab line for every job with a schedule in the config file."""
    from jobrunner import crontab

    config = load_config(ctx, **flags)
    click.echo("\n".join(crontab.lines(config)))
    return 0


def main() -> None:
    cli(prog_name="jobrunner")
