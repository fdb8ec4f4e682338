"""`geometryd` command line: one subcommand per module, each registered by that module.

Each command module exposes ``register(subparsers)``, which adds its parser and sets ``func`` (a callable
taking the parsed args and returning an exit code). Command modules import heavy packages (Jittor, torch,
PyAV) inside their functions, never at module level, so ``geometryd --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand, module) in the order shown by --help.
COMMAND_MODULES: list[str] = [
    "daemon.supervisor",  # run
    "daemon.demo",  # demo
    "daemon.process",  # process
    "daemon.doctor",  # doctor
    "daemon.weights",  # weights
    "daemon.bench_cmd",  # bench
    "daemon.config",  # check-config
    "daemon.subscribe",  # subscribe
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geometryd",
        description="Video -> temporally consistent depth and point maps (GeometryCrafter), over MQTT.",
    )
    from daemon import __version__

    parser.add_argument("--version", action="version", version=f"geometryd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # not built yet
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
