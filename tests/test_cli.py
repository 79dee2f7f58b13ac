"""The command line as a whole: every command loads, and every option explains itself."""
import click
import pytest
from click.testing import CliRunner

from mosaic_toolkit.cli import COMMANDS, main


def _all_commands():
    ctx = click.Context(main)
    for name in COMMANDS:
        cmd = main.get_command(ctx, name)
        yield name, cmd
        if isinstance(cmd, click.Group):
            for sub in cmd.list_commands(ctx):
                yield f"{name} {sub}", cmd.get_command(ctx, sub)


def test_top_level_help_lists_every_command():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name,cmd", list(_all_commands()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_option_has_help(name, cmd):
    assert cmd is not None, f"{name}: command module did not load"
    assert cmd.help, f"{name}: command has no help text"
    for param in cmd.params:
        if isinstance(param, click.Option) and param.name not in ("help",):
            assert param.help, f"{name}: option {param.opts} has no help text"
    result = CliRunner().invoke(main, name.split() + ["--help"])
    assert result.exit_code == 0, result.output
