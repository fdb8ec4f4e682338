"""`geometryd` command line: one subcommand per module, each registered by that module.

Each command module exposes ``register(subparsers)``, which adds its parser and sets ``func`` (a callable
taking the parsed args and returning an exit code). Only the module of the command being run is imported,
so a broken optional part (or a heavy import) cannot stop ``geometryd doctor`` or ``geometryd --help``;
command modules still import Jittor, torch and PyAV inside their functions, never at module level.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from daemon import __version__

# subcommand -> (module, one-line help), in the order shown by --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("daemon.commands.run", "run the streaming daemon (sources -> geometry -> MQTT/files)"),
    "demo": ("daemon.commands.demo", "end-to-end demo on a generated clip with a tiny random-weight model"),
    "process": ("daemon.commands.process", "offline: one video file -> upstream-compatible .npz"),
    "doctor": ("daemon.commands.doctor",
               "check this machine's stack; --fix applies the Jittor CUDA 13 patches"),
    "weights": ("daemon.commands.weights", "pull / check / make-tiny model folders in the official layout"),
    "bench": ("daemon.commands.bench", "run the CPU benchmark suite (--gpu: the GPU table)"),
    "check-config": ("daemon.commands.check_config",
                     "validate a config file: prints ok or one error line (exit 2)"),
    "subscribe": ("daemon.commands.subscribe",
                  "reference MQTT subscriber: decode published frames to arrays"),
    "batch": ("daemon.commands.batch",
              "offline: many video files -> DIR/<name>.npz + manifest.jsonl (--ray: on Ray)"),
    "cluster": ("daemon.commands.cluster", "run GPU actors (one daemon per GPU) on a Ray cluster"),
}
COMMAND_MODULES: list[str] = [module for module, _ in COMMANDS.values()]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser when ``command`` is None (imports every command module), else just that command's."""
    parser = argparse.ArgumentParser(
        prog="geometryd",
        description="Video -> temporally consistent depth and point maps (GeometryCrafter), over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"geometryd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        if command is None or name == command:
            importlib.import_module(module_name).register(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else "")
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
