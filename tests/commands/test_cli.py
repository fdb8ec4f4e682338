from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from daemon.cli import COMMANDS, build_parser


def test_every_command_module_registers() -> None:
    parser = build_parser()  # imports every command module: a missing one fails here
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)
    for name, command_parser in sub.choices.items():
        nested = [a for a in command_parser._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:  # e.g. `weights pull|check|make-tiny`: every leaf runs something, the group needs one
            assert nested[0].required, f"{name}: a bare `geometryd {name}` must ask for a subcommand"
            for leaf, leaf_parser in nested[0].choices.items():
                assert leaf_parser.get_default("func") is not None, f"{name} {leaf} sets no func"
        else:
            assert command_parser.get_default("func") is not None, f"{name} sets no func"


def test_top_level_help_lists_commands_without_importing_them() -> None:
    code = (
        "import sys; from daemon.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('jittor', 'torch', 'av', 'daemon.supervisor') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in COMMANDS:
        assert name in out.stdout
    assert "HEAVY []" in out.stdout


@pytest.mark.parametrize("cmd", list(COMMANDS))
def test_help_of_each_command(cmd: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "daemon", cmd, "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "usage: geometryd" in out.stdout and cmd in out.stdout
