"""`geometryd check-config`: validate a config file; prints ok or one error line (exit 2)."""

from __future__ import annotations

import argparse
import json

from daemon.config import DEFAULT_CONFIG_PATH, load_config_or_exit


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check-config",
        help="validate a config file (prints `ok`, or one error line and exits 2)",
        description="Validate a geometryd config file. Prints `ok` (exit 0) or one line "
        "`config error: <key> = <value>: <allowed>` on stderr (exit 2).",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG_PATH, help="config file (default: ./config.toml)")
    parser.add_argument(
        "--print", action="store_true", help="also print the effective config (secrets hidden) as JSON"
    )
    parser.add_argument(
        "--syntax-only", action="store_true",
        help="skip the checks that need the files on this machine (model folder, checkpoint, source files)",
    )
    parser.set_defaults(func=_cmd_check_config)


def _cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load_config_or_exit(args.config, runnable=not args.syntax_only)
    if args.print:
        print(json.dumps(cfg.redacted(), indent=2))
    print("ok")
    return 0
