"""`geometryd run`: load and check the config, set up logging, run the daemon until it stops."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from daemon.config import load_config_or_exit
from daemon.logging_setup import setup_logging
from daemon.supervisor import Daemon


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run the streaming daemon (sources -> depth/point maps -> MQTT)",
                              description="Run the streaming daemon with the sources of a config file.")
    p.add_argument("--config", default="config.toml", help="config file (default: ./config.toml)")
    p.add_argument("--exit-when-done", action="store_true",
                   help="exit 0 once every file source has ended (and was flushed); 1 if one failed")
    p.add_argument("--summary", metavar="JSON",
                   help="write per-source counters and loop-lag stats here at exit")
    # PLUMBING ONLY (bench/e2e_cpu.py): replace the pipeline by the identity processor with this
    # per-window delay. Hidden: it produces no geometry.
    p.add_argument("--plumbing-identity-delay", type=float, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config_or_exit(args.config, runnable=True)
    if args.summary and (problem := _unwritable(Path(args.summary))):
        print(f"geometryd run: error: --summary {args.summary}: {problem}", file=sys.stderr)
        return 2
    setup_logging(cfg.logging.level, cfg.logging.format)
    daemon = Daemon(cfg, exit_when_done=args.exit_when_done, identity_delay=args.plumbing_identity_delay,
                    summary_path=args.summary)
    return asyncio.run(daemon.run())


def _unwritable(path: Path) -> str | None:
    """Why a file cannot be written at ``path`` (checked before startup, not after the run), or None."""
    folder = path.parent
    if not folder.is_dir():
        return f"the folder {folder} does not exist"
    if path.is_dir():
        return "is a folder"
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return "permission denied"
    return None


