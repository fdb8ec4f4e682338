"""`geometryd batch INPUTS... --out DIR [--ray ADDRESS]`: a video archive -> one upstream npz per video.

Inputs are files, folders (their video files, sorted) and globs. Each input becomes ``DIR/<stem>.npz``
(``point_map`` float16, ``mask`` bool: the layout of `geometryd process`, same options and defaults) and one
line of ``DIR/manifest.jsonl`` (input, output, status ok|failed|skipped, frames, seconds, error, worker).
An input whose npz exists is skipped (npz files are written under a temporary name and renamed, so an
existing one is complete): a batch that was interrupted resumes where it stopped. A bad input fails alone.

Without ``--ray`` the videos run serially in this process (model loaded once). With ``--ray ADDRESS``
(``local``, ``auto``, ``ray://...``) one Ray actor per GPU (``--gpus-per-worker``, fractional or logical on
a CPU box) loads the model once and takes one video after another (daemon/cluster/batch_pool.py).
Exit codes: 0 all ok or skipped, 1 some input failed (one-line summary on stderr), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

from daemon.cluster.batch_pool import run_on_ray
from daemon.commands.process import add_processing_options
from daemon.offline.batch import (
    MANIFEST,
    Manifest,
    UsageError,
    expand_inputs,
    is_complete,
    output_paths,
    run_serial,
)
from daemon.offline.options import ProcessOptions, check_model_parts
from daemon.offline.worker import VideoResult

log = logging.getLogger(__name__)

def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "batch", help="process many video files (files, folders, globs) into DIR/<name>.npz + manifest.jsonl",
        description="Offline GeometryCrafter on a video archive: one npz per input, resumable, optionally "
                    "spread over a Ray cluster (one model-holding actor per GPU).")
    p.add_argument("inputs", nargs="+", help="video files, folders of videos, or globs")
    p.add_argument("--out", type=Path, required=True, help="output folder (npz files and manifest.jsonl)")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run on Ray: local (start one here), auto (this node's cluster) or ray://host:port")
    p.add_argument("--workers", type=int, default=0,
                   help="Ray actors (default: one per GPU of the cluster, at least 1)")
    p.add_argument("--gpus-per-worker", type=float, default=1.0,
                   help="GPUs each Ray actor asks for (fractional shares GPUs; default 1)")
    p.add_argument("--local-gpus", type=int, default=None,
                   help="with --ray local: GPUs the local cluster announces (logical ones on a CPU box)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    p.add_argument("--model-dir", type=Path, required=True, help="model folder (merged official layout)")
    add_processing_options(p)
    p.set_defaults(func=run)


# ---- running ---------------------------------------------------------------------------------------------
def options_from_args(args: argparse.Namespace) -> ProcessOptions:
    return ProcessOptions.from_args(args)


def _validate(args: argparse.Namespace) -> None:
    if not args.model_dir.is_dir():
        raise UsageError(f"model folder not found: {args.model_dir}")
    ProcessOptions.from_args(args).check()
    if args.gpus_per_worker < 0 or args.workers < 0:
        raise UsageError("--workers and --gpus-per-worker must be >= 0")

    check_model_parts(Path(args.model_dir), args.variant)


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        _validate(args)
        inputs = expand_inputs(args.inputs)
        outputs = output_paths(inputs, args.out)
    except UsageError as exc:
        print(f"geometryd batch: error: {exc}", file=sys.stderr)
        return 2
    manifest = Manifest(args.out / MANIFEST)
    results: list[VideoResult] = []
    jobs: list[tuple[Path, Path]] = []
    for video, out in outputs.items():
        if is_complete(out):
            res = VideoResult(str(video), str(out), "skipped", error=None)
            manifest.write(res)
            results.append(res)
        else:
            jobs.append((video, out))
    bar = _progress(len(jobs), args.no_progress)

    def on_result(res: VideoResult) -> None:
        manifest.write(res)
        results.append(res)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{Path(res.input).name}: {res.status}")
        else:
            log.info("%s: %s (%d frames, %.1f s)%s", res.input, res.status, res.frames, res.seconds,
                     f": {res.error}" if res.error else "")

    t0 = time.perf_counter()
    try:
        if jobs and args.ray:
            run_on_ray(args.ray, options_from_args(args), jobs, on_result, workers=args.workers,
                       gpus_per_worker=args.gpus_per_worker, local_gpus=args.local_gpus)
        elif jobs:
            run_serial(options_from_args(args), jobs, on_result)
    finally:
        manifest.close()
        if bar is not None:
            bar.close()
    return _summarise(results, time.perf_counter() - t0)


def _progress(total: int, disabled: bool) -> tqdm | None:
    if disabled or not total or not sys.stderr.isatty():
        return None

    return tqdm(total=total, unit="video", file=sys.stderr)


def _summarise(results: list[VideoResult], seconds: float) -> int:
    n = {s: sum(1 for r in results if r.status == s) for s in ("ok", "skipped", "failed")}
    failed = [r for r in results if r.status == "failed"]
    line = (f"{n['ok']} ok, {n['skipped']} skipped, {n['failed']} failed of {len(results)} inputs in "
            f"{seconds:.1f} s")
    if failed:
        first = failed[0]
        print(f"geometryd batch: {line}; first failure: {first.input}: {first.error}", file=sys.stderr)
        return 1
    print(f"geometryd batch: {line}")
    return 0
