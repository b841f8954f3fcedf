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
