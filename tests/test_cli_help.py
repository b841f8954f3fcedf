"""Every command documents itself."""

import pytest

from jobrunner.cli import cli


def all_commands():
    return sorted(cli.commands)


def test_there_are_commands():
    assert {"run", "list", "status"} <= set(all_commands())


@pytest.mark.parametrize("name", all_commands())
def test_every_command_has_help(cli_runner_help, name):
    out = cli_runner_help(name, "--help")
    assert out.returncode == 0
    assert cli.commands[name].help and cli.commands[name].help.strip()
    assert cli.commands[name].help.splitlines()[0] in out.stdout
    for param in cli.commands[name].params:
        if param.param_type_name == "option":
            assert param.help, f"{name} {param.opts} has no help text"


def test_top_level_help_lists_exit_codes(cli_runner_help):
    out = cli_runner_help("--help")
    assert out.returncode == 0 and "75 job already running" in out.stdout


@pytest.fixture
def cli_runner_help(cli):
    return cli


def test_the_readmes_options_table_and_run_help_name_the_same_options(cli_runner_help):
    """The README's table of `jobrunner run` options is the manual most people read."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("`jobrunner run JOB [options]`", 1)[1].split("\n\n", 2)[1]
    documented = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", table))
    run = cli.commands["run"]
    offered = {opt for param in run.params for opt in param.opts if opt.startswith("--")} - {"--help"}
    assert documented == offered, {
        "missing from the README": sorted(offered - documented),
        "not an option": sorted(documented - offered),
    }
