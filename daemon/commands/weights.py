"""`geometryd weights pull|check|make-tiny`: manage the model folder (official layout)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from daemon.weights.manifest import check_model_dir
from daemon.weights.pull import (
    DEFAULT_REVISIONS,
    PRIORS,
    VARIANTS,
    PullError,
    parse_revisions,
    pull,
    pull_plan,
)
from daemon.weights.tiny import make_tiny


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "weights",
        help="download (pull), verify (check) or generate random tiny (make-tiny) model weights",
        description="Manage the model folder (merged official layout, see config.toml [model] dir).",
    )
    sub = parser.add_subparsers(dest="weights_command", metavar="SUBCOMMAND")
    sub.required = True

    p = sub.add_parser(
        "pull",
        help="download the official weights into one folder",
        description="Download the official weights (about 9.2 GB) into one folder. SVD-xt is licence-gated: "
        "accept its licence on huggingface.co and export HF_TOKEN.",
    )
    p.add_argument("--to", required=True, type=Path, help="target folder (created)")
    p.add_argument(
        "--revision",
        action="append",
        default=[],
        metavar="REPO=REV",
        help="pin a repo to a commit/branch (repeatable); defaults: "
        + ", ".join(f"{r}={v[:12]}" for r, v in DEFAULT_REVISIONS.items()),
    )
    p.add_argument("--variant", choices=VARIANTS, default="all", help="which UNet(s) to fetch")
    p.add_argument("--prior", choices=PRIORS, default="moge1",
                   help="MoGe-1 (moge/, default), MoGe-2 (moge2/, for prior.model = \"moge2\") or both")
    p.add_argument("--dry-run", action="store_true", help="print the file plan and exit")
    p.set_defaults(func=_cmd_pull)

    c = sub.add_parser("check", help="verify a model folder against the official key manifests")
    c.add_argument("dir", type=Path, help="model folder")
    c.add_argument(
        "--structure-only",
        action="store_true",
        help="check layout and key names, not shapes (a make-tiny folder passes)",
    )
    c.add_argument("--variant", choices=VARIANTS, default="all", help="which UNet(s) are required")
    c.add_argument("--prior", choices=PRIORS, default="moge1", help="which MoGe checkpoint(s) are required")
    c.set_defaults(func=_cmd_check)

    t = sub.add_parser("make-tiny", help="write a tiny random-weight model folder (tests, demo)")
    t.add_argument("dir", type=Path, help="target folder")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    t.add_argument("--force", action="store_true", help="rewrite every part (default: only missing parts)")
    t.set_defaults(func=_cmd_make_tiny)


def _cmd_pull(args: argparse.Namespace) -> int:
    try:
        plan = pull_plan(args.variant, parse_revisions(args.revision), getattr(args, "prior", "moge1"))
    except ValueError as exc:
        print(f"weights pull: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        for p in plan:
            print(f"{p.repo_id}@{p.revision[:12]}  {p.filename}  ->  {args.to / p.dest}")
        return 0
    try:
        pull(args.to, plan)
    except PullError as exc:
        print(f"weights pull: {exc}", file=sys.stderr)
        return 1
    print(f"downloaded {len(plan)} files into {args.to}")
    return _report(args.to, structure_only=False, variant=args.variant)


def _cmd_check(args: argparse.Namespace) -> int:
    if not args.dir.is_dir():
        print(f"weights check: {args.dir}: no such folder", file=sys.stderr)
        return 1
    return _report(args.dir, args.structure_only, args.variant, getattr(args, "prior", "moge1"))


def _report(root: Path, structure_only: bool, variant: str, prior: str = "moge1") -> int:

    reports = check_model_dir(root, structure_only=structure_only, variant=variant, prior=prior)
    for r in reports:
        print(r.summary())
        for problem in r.problems:
            print(f"  {problem}")
    bad = [r.name for r in reports if not r.ok]
    mode = "structure" if structure_only else "keys and shapes"
    if bad:
        print(f"FAIL ({mode}): {len(bad)} of {len(reports)} parts have problems: {', '.join(bad)}")
        return 1
    print(f"ok ({mode}): {root}")
    return 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    make_tiny(args.dir, seed=args.seed, force=args.force)
    print(f"tiny model in {args.dir} (seed {args.seed}); random weights make no real predictions")
    return 0
