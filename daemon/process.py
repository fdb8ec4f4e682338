"""`geometryd process VIDEO`: offline GeometryCrafter on one file, upstream semantics (run.py, spec 4.1/4.7).

Stages: decode (PyAV) -> MoGe priors through the real sidecar process (``daemon.stages.prior.run_priors``)
-> ``GeometryCrafter`` (offline ``__call__``) -> ``OUT.npz`` with ``point_map`` float16 (T,H,W,3) and
``mask`` bool (T,H,W) (upstream-compatible), optionally a 16-bit PNG depth sequence (the png16 encoding of
``daemon.encoding``: inverse depth quantised, 0 = invalid, scale/offset in the PNG's tEXt chunks) and a
colourised disparity preview (PNG montage or MP4). Exit codes: 0 ok, 2 bad arguments/inputs, 1 failure.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

from daemon.downsample import downsample_frames, downsampled_size, quantize_frames, upsample_output

log = logging.getLogger(__name__)


class UsageError(ValueError):
    """Bad arguments or inputs (exit 2)."""


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
                   help="> 1: shrink frames by this factor (bicubic, antialiased) before everything, upsample "
                        "the result back (bilinear) as run.py does (default 1.0)")
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
    from daemon.tiny import missing_parts

    need = {f"unet_{args.variant}", "point_map_vae", "vae", "image_encoder", "feature_extractor", "scheduler",
            "moge"}
    missing = sorted(need & set(missing_parts(args.model_dir)))
    if missing:
        raise UsageError(f"model folder {args.model_dir} is missing: {', '.join(p + '/' for p in missing)}")


PRIOR_RING_BYTES = 512 << 20  # shared-memory budget of the prior ring (frame + points + mask per slot)


def prior_ring_slots(height: int, width: int, most: int = 16) -> int:
    """Ring slots for the offline prior: at most ``most``, fewer for big frames (a 3840x2160 slot is
    133 MB: 3 slots instead of 16 keep the ring at 0.4 GB instead of 2.1 GB)."""
    per_slot = height * width * (3 + 12 + 1)
    return max(1, min(most, PRIOR_RING_BYTES // per_slot))


def _network_dtype(choice: str) -> str:
    if choice != "auto":
        return choice
    from daemon.jittor_env import detect_cuda

    return "fp16" if detect_cuda().driver_ok else "fp32"


def disparity_colours(depth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(T,H,W) depth -> (T,H,W,3) uint8 RGB: disparity 1/(Z+1e-4), robust range as spec 4.7 step 7 (app)."""
    import cv2

    from daemon.resample import quantile_nearest

    disp = (1.0 / (depth + np.float32(1e-4))).astype(np.float32) * mask
    lo = min(quantile_nearest(d, 1 - 0.99) for d in disp)
    hi = max(quantile_nearest(d, 0.99) for d in disp)
    norm = np.clip((disp - lo) / (hi - lo + np.float32(1e-4)), 0, 1)
    out = np.empty(depth.shape + (3,), np.uint8)
    for i, d in enumerate(norm):
        bgr = cv2.applyColorMap((d * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
        bgr[~mask[i]] = 0
        out[i] = bgr[..., ::-1]
    return out


def write_preview(path: Path, frames: np.ndarray, depth: np.ndarray, mask: np.ndarray, fps: float) -> None:
    """PNG: up to 8 evenly spaced frames, input above disparity; MP4: input | disparity per frame."""
    colours = disparity_colours(depth, mask)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".png":
        import cv2

        idx = np.unique(np.linspace(0, len(frames) - 1, min(8, len(frames))).round().astype(int))
        grid = np.concatenate([np.concatenate([frames[i], colours[i]], axis=0) for i in idx], axis=1)
        if not cv2.imwrite(str(path), grid[..., ::-1]):
            raise OSError(f"cannot write {path}")
    else:
        from daemon.video import write_video

        side = np.concatenate([frames, colours], axis=2)
        h, w = side.shape[1:3]
        write_video(path, side[:, : h - h % 2, : w - w % 2], fps=fps or 10.0)


def write_png_depth(folder: Path, depth: np.ndarray, mask: np.ndarray) -> list[Path]:
    """One ``depth_<i:06d>.png`` per frame: png16 of daemon.encoding (inverse depth, tEXt scale/offset)."""
    from daemon.encoding import png16_encode, quantize_depth

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(depth.shape[0]):
        q, props = quantize_depth(depth[i], mask[i])
        p = folder / f"depth_{i:06d}.png"
        p.write_bytes(png16_encode(q, text=props))
        paths.append(p)
    return paths


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        _validate(args)
        return _process(args)
    except UsageError as exc:
        print(f"geometryd process: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - report any processing failure as exit 1 with its cause
        log.debug("processing failed", exc_info=True)
        print(f"geometryd process: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _process(args: argparse.Namespace) -> int:
    from daemon.video import VideoError, read_frames

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        frames, fps = read_frames(args.video, stride=args.stride, max_frames=args.max_frames)
    except VideoError as exc:
        raise UsageError(str(exc)) from exc
    timings["decode_video"] = time.perf_counter() - t0
    t, h0, w0 = frames.shape[:3]
    height, width = (args.height, args.width) if args.height else (h0, w0)
    if height % 64 or width % 64:
        raise UsageError(f"source size {w0}x{h0} is not a multiple of 64: give --height and --width")
    if h0 % 2 or w0 % 2:
        raise UsageError(f"source size {w0}x{h0} must be even in both dimensions")
    if not 0.5 <= width / height <= 2.0:
        raise UsageError(f"processing aspect ratio {width}x{height} is outside [0.5, 2]")
    source = frames
    if args.downsample_ratio > 1.0:  # run.py: after choosing the processing size, before the pipeline
        hs, ws = downsampled_size(h0, w0, args.downsample_ratio)
        if hs < 2 or ws < 2 or hs % 2 or ws % 2:
            raise UsageError(f"--downsample-ratio {args.downsample_ratio} gives frames {ws}x{hs}: "
                             "both must be even and >= 2")
        source = downsample_frames(frames, args.downsample_ratio)

    from daemon.stages.prior import run_priors

    t0 = time.perf_counter()
    prior_frames = quantize_frames(source) if source is not frames else frames
    slots = prior_ring_slots(h0, w0)
    points, mask = run_priors(prior_frames, args.model_dir / "moge" / "model.pt", device=args.device,
                              fp16=False, resolution_level=9, python=args.prior_python or None,
                              chunk=min(args.decode_chunk, slots), n_slots=slots)
    timings["prior_moge"] = time.perf_counter() - t0
    log.info("priors for %d frames in %.1f s", t, timings["prior_moge"])

    from daemon.pipeline import GeometryCrafter

    t0 = time.perf_counter()
    dtype = _network_dtype(args.dtype)
    gc = GeometryCrafter.from_pretrained(args.model_dir, variant=args.variant, dtype=dtype)
    timings["load_model"] = time.perf_counter() - t0
    out = gc(source, points, mask, height=height, width=width, window_size=args.window, overlap=args.overlap,
             num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
             decode_chunk_size=args.decode_chunk, force_projection=args.force_projection,
             force_fixed_focal=args.force_fixed_focal, use_extract_interp=args.use_extract_interp,
             track_time=args.track_time, low_memory_usage=args.low_memory, seed=args.seed)
    timings.update(out.timings)
    if source is not frames:
        out.point_map, out.mask = upsample_output(out.point_map, out.mask, (h0, w0))
        out.depth = np.ascontiguousarray(out.point_map[..., 2])

    t0 = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, point_map=out.point_map.astype(np.float16), mask=out.mask.astype(bool))
    if args.png_depth is not None:
        write_png_depth(args.png_depth, out.depth, out.mask)
    if args.preview is not None:
        write_preview(args.preview, frames, out.depth, out.mask, fps)
    timings["write"] = time.perf_counter() - t0
    summary = ", ".join(f"{k} {v:.2f} s" for k, v in timings.items())
    log.info("wrote %s (%d frames %dx%d); %s", args.out, t, w0, h0, summary)
    print(f"{args.out}: {t} frames {w0}x{h0} ({summary})")
    return 0
