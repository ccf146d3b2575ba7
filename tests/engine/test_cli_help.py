"""Every `pairuni` subcommand prints its help and exits 0 (argparse formats help lazily, so a
stray `%` in a help string only fails when a user asks for help)."""

from __future__ import annotations

import pytest

from engine.cli import build_parser, main


def _commands() -> list[str]:
    parser = build_parser()
    sub = next(action for action in parser._actions if action.dest == "command")
    return sorted(sub.choices)


@pytest.mark.parametrize("command", _commands())
def test_help_of_every_command_exits_zero(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: pairuni {command}")
