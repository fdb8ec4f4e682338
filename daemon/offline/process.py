"""Offline GeometryCrafter on one decoded clip, upstream semantics (run.py, spec 4.1/4.7): the library behind
`geometryd process`."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from daemon.jittor_env import detect_cuda
from daemon.model.downsample import downsample_frames, downsampled_size, quantize_frames, upsample_output
from daemon.model.resample import quantile_nearest
from daemon.pipeline import GeometryCrafter
from daemon.stages.prior import run_priors
from daemon.video import VideoError, read_frames, write_video
from daemon.wire.encoding import png16_encode, quantize_depth

log = logging.getLogger(__name__)


class UsageError(ValueError):
    """Bad arguments or inputs (exit 2)."""


PRIOR_RING_BYTES = 512 << 20  # shared-memory budget of the prior ring (frame + points + mask per slot)


def prior_ring_slots(height: int, width: int, most: int = 16) -> int:
    """Ring slots for the offline prior: at most ``most``, fewer for big frames (a 3840x2160 slot is
    133 MB: 3 slots instead of 16 keep the ring at 0.4 GB instead of 2.1 GB)."""
    per_slot = height * width * (3 + 12 + 1)
    return max(1, min(most, PRIOR_RING_BYTES // per_slot))


def network_dtype(choice: str) -> str:
    if choice != "auto":
        return choice

    return "fp16" if detect_cuda().driver_ok else "fp32"


def disparity_colours(depth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(T,H,W) depth -> (T,H,W,3) uint8 RGB: disparity 1/(Z+1e-4), robust range as spec 4.7 step 7 (app)."""
    import cv2

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
        side = np.concatenate([frames, colours], axis=2)
        h, w = side.shape[1:3]
        write_video(path, side[:, : h - h % 2, : w - w % 2], fps=fps or 10.0)


def write_png_depth(folder: Path, depth: np.ndarray, mask: np.ndarray) -> list[Path]:
    """One ``depth_<i:06d>.png`` per frame: png16 of daemon.wire.encoding (inverse depth, tEXt
    scale/offset)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(depth.shape[0]):
        q, props = quantize_depth(depth[i], mask[i])
        p = folder / f"depth_{i:06d}.png"
        p.write_bytes(png16_encode(q, text=props))
        paths.append(p)
    return paths


def process_file(args: argparse.Namespace) -> int:
    """Decode ``args.video``, run priors and GeometryCrafter, write ``args.out`` (+ PNG depth / preview)."""
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

    t0 = time.perf_counter()
    prior_frames = quantize_frames(source) if source is not frames else frames
    slots = prior_ring_slots(h0, w0)
    points, mask = run_priors(prior_frames, args.model_dir / "moge" / "model.pt", device=args.device,
                              fp16=False, resolution_level=9, python=args.prior_python or None,
                              chunk=min(args.decode_chunk, slots), n_slots=slots)
    timings["prior_moge"] = time.perf_counter() - t0
    log.info("priors for %d frames in %.1f s", t, timings["prior_moge"])

    t0 = time.perf_counter()
    dtype = network_dtype(args.dtype)
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
