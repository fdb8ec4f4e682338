"""`geometryd process VIDEO`: offline GeometryCrafter on one file, upstream semantics (run.py, spec 4.1/4.7).

Stages (daemon/offline/run.py, shared with `geometryd batch`): streamed decode (PyAV) -> MoGe priors through
the real sidecar process -> GeometryCrafter (offline semantics) -> ``OUT.npz`` with ``point_map`` float16
(T,H,W,3) and ``mask`` bool (T,H,W) (upstream-compatible), optionally a 16-bit PNG depth sequence (the png16
encoding of ``daemon.wire.encoding``: inverse depth quantised, 0 = invalid, scale/offset in the PNG's tEXt
chunks) and a colourised disparity preview (PNG montage or MP4). ``--out OUT.mcap`` writes the daemon's MCAP
channels instead of the npz (daemon/stages/publish_mcap.py); ``--format ply`` writes one binary PLY per frame
(daemon.offline.ply). Exit codes: 0 ok, 2 bad arguments/inputs, 1 failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from daemon.intrinsics import check_pixel_intrinsics
from daemon.offline.options import DEFAULTS as D
from daemon.offline.options import ProcessOptions, check_model_parts
from daemon.offline.process import UsageError, process_file

log = logging.getLogger(__name__)


def add_processing_options(p: argparse.ArgumentParser) -> None:
    """run.py's options under its names (dashes for underscores; the short names are aliases), defaults from
    ProcessOptions; dests are ProcessOptions' field names (`geometryd process` and `geometryd batch`)."""
    p.add_argument("--model-type", "--variant", dest="variant", choices=("diff", "determ"), default=D.variant,
                   help=f"UNet variant (default {D.variant})")
    p.add_argument("--height", type=int, default=D.height,
                   help="processing height, multiple of 64 (default: source)")
    p.add_argument("--width", type=int, default=D.width,
                   help="processing width, multiple of 64 (default: source)")
    p.add_argument("--downsample-ratio", type=float, default=D.downsample_ratio,
                   help="> 1: shrink frames by this factor (bicubic, antialiased) before everything, "
                        "upsample the result back (bilinear) as run.py does (default %(default)s)")
    p.add_argument("--window-size", "--window", dest="window", type=int, default=D.window,
                   help="window size in frames (default %(default)s)")
    p.add_argument("--overlap", type=int, default=D.overlap,
                   help="window overlap in frames (default %(default)s)")
    p.add_argument("--num-inference-steps", "--steps", dest="steps", type=int, default=D.steps,
                   help="denoising steps, diff variant (default %(default)s)")
    p.add_argument("--guidance-scale", type=float, default=D.guidance_scale,
                   help="classifier-free guidance, diff variant; > 1 doubles the UNet calls "
                        "(default %(default)s)")
    p.add_argument("--decode-chunk-size", "--decode-chunk", dest="decode_chunk", type=int,
                   default=D.decode_chunk,
                   help="frames per encoder/decoder call (default %(default)s)")
    p.add_argument("--process-stride", "--stride", dest="stride", type=int, default=D.stride,
                   help="use every N-th frame (default %(default)s)")
    p.add_argument("--process-length", "--max-frames", dest="max_frames", type=int, default=D.max_frames,
                   help="process at most N frames (default -1: all)")
    p.add_argument("--seed", type=int, default=D.seed, help="noise seed (default %(default)s)")
    p.add_argument("--force-projection", action=argparse.BooleanOptionalAction, default=D.force_projection,
                   help="points from one focal and the depth (default on)")
    p.add_argument("--force-fixed-focal", action=argparse.BooleanOptionalAction, default=D.force_fixed_focal,
                   help="with --force-projection: one focal for the clip, else per frame (default on)")
    p.add_argument("--use-extract-interp", action=argparse.BooleanOptionalAction,
                   default=D.use_extract_interp,
                   help="nearest-exact instead of bilinear upsampling of depth and mask (default off)")
    p.add_argument("--low-memory-usage", "--low-memory", dest="low_memory", action="store_true",
                   default=D.low_memory,
                   help="keep big tensors on the host, free device memory")
    p.add_argument("--dtype", choices=("auto", "fp16", "fp32"), default=D.dtype,
                   help="network precision: fp16 = official policy; auto = fp16 on CUDA, fp32 on CPU")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=D.device,
                   help="device of the MoGe prior")
    p.add_argument("--prior-python", default=D.prior_python,
                   help="interpreter for the MoGe sidecar (default: this one)")


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
    out.add_argument("--out", type=Path, help="output .npz (point_map float16, mask bool) or .mcap (the "
                     "daemon's Foxglove channels: depth, colour, points, calibration; docs/foxglove.md); "
                     "with --format ply: a folder")
    out.add_argument("--save-folder", type=Path, default=None, metavar="DIR",
                     help="write DIR/<video name>.npz as run.py does")
    add_processing_options(p)
    p.add_argument("--track-time", action="store_true", help="print the elapsed time per stage")
    p.add_argument("--png-depth", type=Path, default=None, metavar="DIR",
                   help="also write 16-bit PNG depth frames")
    p.add_argument("--preview", type=Path, default=None, metavar="PNG|MP4",
                   help="colourised disparity preview")
    p.add_argument("--intrinsics", type=_intrinsics, default=None, metavar="FX,FY,CX,CY",
                   help="known camera intrinsics in pixels of the video's size (OpenCV convention); they "
                        "replace the estimated focal in the projection step")
    p.add_argument("--format", dest="formats", type=_formats, default=("npz",), metavar="npz|ply|npz,ply",
                   help="output formats: npz (default) and/or ply (one binary PLY per frame, xyz + rgb, "
                        "valid points only, in the --out folder; npz then goes to OUT/<video name>.npz)")
    p.set_defaults(func=run)


FORMATS = ("npz", "ply")


def _formats(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [n for n in names if n not in FORMATS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"formats are npz, ply or npz,ply; got {text!r}")
    return names


def _intrinsics(text: str) -> tuple[float, ...]:
    try:
        return check_pixel_intrinsics([float(v) for v in text.split(",")])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (FX,FY,CX,CY in pixels)") from None


def _output_paths(args: argparse.Namespace) -> None:
    """args.out (the .npz or None) and args.ply_dir (the PLY folder or None) from
    --out/--save-folder/--format."""
    args.ply_dir = None
    if "ply" in args.formats:
        folder = args.out if args.out is not None else args.save_folder
        if folder.suffix == ".npz":
            raise UsageError(f"--format ply writes a folder of .ply files: give --out DIR, got {folder}")
        args.ply_dir = folder
        args.out = folder / f"{args.video.name.split('.')[0]}.npz" if "npz" in args.formats else None
        return
    if args.out is None:
        args.out = args.save_folder / f"{args.video.name.split('.')[0]}.npz"  # run.py's file name
    if args.out.suffix not in (".npz", ".mcap"):
        raise UsageError(f"--out must end in .npz or .mcap, got {args.out}")


def _validate(args: argparse.Namespace) -> None:
    if not args.video.is_file():
        raise UsageError(f"video file not found: {args.video}")
    if not args.model_dir.is_dir():
        raise UsageError(f"model folder not found: {args.model_dir}")
    ProcessOptions.from_args(args).check()
    if args.preview is not None and args.preview.suffix.lower() not in (".png", ".mp4"):
        raise UsageError(f"--preview must end in .png or .mp4, got {args.preview}")
    _output_paths(args)
    if args.intrinsics is not None and not args.force_projection:
        raise UsageError("--intrinsics replace the focal of the projection step: "
                         "they need --force-projection")

    check_model_parts(Path(args.model_dir), args.variant)


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
