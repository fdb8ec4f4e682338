"""`geometryd process VIDEO`: offline GeometryCrafter on one file, upstream semantics (run.py, spec 4.1/4.7).

Stages: decode (PyAV) -> MoGe priors through the real sidecar process (``daemon.stages.prior.run_priors``)
-> ``GeometryCrafter`` (offline ``__call__``) -> ``OUT.npz`` with ``point_map`` float16 (T,H,W,3) and
``mask`` bool (T,H,W) (upstream-compatible), optionally a 16-bit PNG depth sequence (the png16 encoding of
``daemon.wire.encoding``: inverse depth quantised, 0 = invalid, scale/offset in the PNG's tEXt chunks) and a
colourised disparity preview (PNG montage or MP4). Exit codes: 0 ok, 2 bad arguments/inputs, 1 failure.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from daemon.offline.process import UsageError, process_file
from daemon.weights.tiny import missing_parts

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "process",
        help="process one video file offline into an upstream-compatible .npz of point maps",
        description="Run GeometryCrafter on a whole video file (offline, exact upstream semantics).",
    )
    p.add_argument("video", type=Path, help="input video file (run.py video_path)")
    p.add_argument("--model-dir", type=Path, required=True,
                   help="model folder (merged official layout; replaces run.py --cache_dir and the hub)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", type=Path, help="output .npz (point_map float16, mask bool)")
    out.add_argument("--save-folder", type=Path, default=None, metavar="DIR",
                     help="write DIR/<video name>.npz as run.py does")
    # run.py's options under its names (dashes for underscores); the short names are aliases
    p.add_argument("--model-type", "--variant", dest="variant", choices=("diff", "determ"), default="diff",
                   help="UNet variant (default diff)")
    p.add_argument("--height", type=int, default=0,
                   help="processing height, multiple of 64 (default: source)")
    p.add_argument("--width", type=int, default=0, help="processing width, multiple of 64 (default: source)")
    p.add_argument("--downsample-ratio", type=float, default=1.0,
                   help="> 1: shrink frames by this factor (bicubic, antialiased) before everything, "
                        "upsample the result back (bilinear) as run.py does (default 1.0)")
    p.add_argument("--window-size", "--window", dest="window", type=int, default=110,
                   help="window size in frames (default 110)")
    p.add_argument("--overlap", type=int, default=25, help="window overlap in frames (default 25)")
    p.add_argument("--num-inference-steps", "--steps", dest="steps", type=int, default=5,
                   help="denoising steps, diff variant (default 5)")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="classifier-free guidance, diff variant; > 1 doubles the UNet calls (default 1.0)")
    p.add_argument("--decode-chunk-size", "--decode-chunk", dest="decode_chunk", type=int, default=8,
                   help="frames per encoder/decoder call (default 8)")
    p.add_argument("--process-stride", "--stride", dest="stride", type=int, default=1,
                   help="use every N-th frame (default 1)")
    p.add_argument("--process-length", "--max-frames", dest="max_frames", type=int, default=-1,
                   help="process at most N frames (default -1: all)")
    p.add_argument("--seed", type=int, default=42, help="noise seed (default 42)")
    p.add_argument("--force-projection", action=argparse.BooleanOptionalAction, default=True,
                   help="points from one focal and the depth (default on)")
    p.add_argument("--force-fixed-focal", action=argparse.BooleanOptionalAction, default=True,
                   help="with --force-projection: one focal for the clip, else per frame (default on)")
    p.add_argument("--use-extract-interp", action=argparse.BooleanOptionalAction, default=False,
                   help="nearest-exact instead of bilinear upsampling of depth and mask (default off)")
    p.add_argument("--track-time", action="store_true", help="print the elapsed time per stage")
    p.add_argument("--low-memory-usage", "--low-memory", dest="low_memory", action="store_true",
                   help="keep big tensors on the host, free device memory")
    p.add_argument("--dtype", choices=("auto", "fp16", "fp32"), default="auto",
                   help="network precision: fp16 = official policy; auto = fp16 on CUDA, fp32 on CPU")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="device of the MoGe prior")
    p.add_argument("--prior-python", default="", help="interpreter for the MoGe sidecar (default: this one)")
    p.add_argument("--png-depth", type=Path, default=None, metavar="DIR",
                   help="also write 16-bit PNG depth frames")
    p.add_argument("--preview", type=Path, default=None, metavar="PNG|MP4",
                   help="colourised disparity preview")
    p.set_defaults(func=run)


def _validate(args: argparse.Namespace) -> None:
    if not args.video.is_file():
        raise UsageError(f"video file not found: {args.video}")
    if not args.model_dir.is_dir():
        raise UsageError(f"model folder not found: {args.model_dir}")
    flags = {"window": "--window-size", "decode_chunk": "--decode-chunk-size", "stride": "--process-stride",
             "steps": "--num-inference-steps"}
    for name, flag in flags.items():
        if getattr(args, name) < 1:
            raise UsageError(f"{flag} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.overlap < args.window:
        raise UsageError(f"--overlap must be in [0, --window-size) = [0, {args.window}), got {args.overlap}")
    if args.max_frames == 0 or args.max_frames < -1:
        raise UsageError(f"--process-length must be -1 (all) or >= 1, got {args.max_frames}")
    if not math.isfinite(args.guidance_scale):
        raise UsageError(f"--guidance-scale must be a finite number, got {args.guidance_scale}")
    if not (math.isfinite(args.downsample_ratio) and args.downsample_ratio > 0):
        raise UsageError(f"--downsample-ratio must be a positive number, got {args.downsample_ratio}")
    if (args.height > 0) != (args.width > 0):
        raise UsageError("give both --height and --width, or neither")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v < 0 or v % 64:
            raise UsageError(f"--{name} must be a positive multiple of 64, got {v}")
    if args.preview is not None and args.preview.suffix.lower() not in (".png", ".mp4"):
        raise UsageError(f"--preview must end in .png or .mp4, got {args.preview}")
    if args.out is None:
        args.out = args.save_folder / f"{args.video.name.split('.')[0]}.npz"  # run.py's file name
    if args.out.suffix != ".npz":
        raise UsageError(f"--out must end in .npz, got {args.out}")

    need = {f"unet_{args.variant}", "point_map_vae", "vae", "image_encoder", "feature_extractor", "scheduler",
            "moge"}
    missing = sorted(need & set(missing_parts(args.model_dir)))
    if missing:
        raise UsageError(f"model folder {args.model_dir} is missing: {', '.join(p + '/' for p in missing)}")


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        _validate(args)
        return process_file(args)
    except UsageError as exc:
        print(f"geometryd process: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - report any processing failure as exit 1 with its cause
        log.debug("processing failed", exc_info=True)
        print(f"geometryd process: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
