from __future__ import annotations

import subprocess
import sys

import pytest

from daemon.cli import COMMAND_MODULES, build_parser


def test_every_command_module_registers() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    names = set(sub.choices)
    for expected in ["run", "demo", "process", "doctor", "weights", "bench", "check-config", "subscribe"]:
        assert expected in names, f"subcommand {expected!r} missing (modules: {COMMAND_MODULES})"


@pytest.mark.parametrize(
    "cmd", ["run", "demo", "process", "doctor", "weights", "bench", "check-config", "subscribe"]
)
def test_help_of_each_command(cmd: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "daemon", cmd, "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "usage: geometryd" in out.stdout
