"""`geometryd cluster`: run GPU actors (one daemon per GPU) on a Ray cluster (docs/scale-out.md)."""

from __future__ import annotations

import argparse
import asyncio

from daemon.cluster.controller import Controller
from daemon.config import load_config_or_exit
from daemon.logging_setup import setup_logging


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("cluster", help="run GPU actors (one geometry daemon per GPU) on a Ray cluster",
                              description="Spread the config's sources over GPU actors on a Ray cluster "
                                          "([cluster] table; docs/scale-out.md).")
    p.add_argument("--config", default="config.toml", help="config file (default: ./config.toml)")
    p.add_argument("--exit-when-done", action="store_true",
                   help="exit once every file source has ended (0, or 1 if one failed)")
    p.add_argument("--summary", metavar="JSON", help="write the final cluster status here at exit")
    p.set_defaults(func=_cmd_cluster)


def _cmd_cluster(args: argparse.Namespace) -> int:
    cfg = load_config_or_exit(args.config)
    setup_logging(cfg.logging.level, cfg.logging.format)
    ctl = Controller(cfg, exit_when_done=args.exit_when_done, summary_path=args.summary)
    return asyncio.run(ctl.run())
