"""`geometryd process` as a library: options -> daemon.offline.run (the one offline code path) -> the npz
or MCAP, PLY, PNG depth and preview sinks. Upstream semantics (run.py, spec 4.1/4.7)."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import numpy as np

from daemon.depth_colour import colourise
from daemon.jittor_env import detect_cuda, import_jittor
from daemon.offline.options import ProcessOptions, UsageError
from daemon.offline.outputs import McapSink, NpzSink, PlySink, PngDepthSink, SourceColours
from daemon.offline.priors import PRIOR_RING_BYTES, PriorClient, prior_ring_slots
from daemon.offline.run import OutputChunk, OutputSink, run_video
from daemon.pipeline import GeometryCrafter
from daemon.video import read_frames, write_video

log = logging.getLogger(__name__)

__all__ = ["PRIOR_RING_BYTES", "UsageError", "prior_ring_slots", "process_file"]


def network_dtype(choice: str) -> str:
    if choice != "auto":
        return choice

    return "fp16" if detect_cuda().driver_ok else "fp32"


def write_preview(path: Path, frames: np.ndarray, depth: np.ndarray, mask: np.ndarray, fps: float) -> None:
    """PNG: up to 8 evenly spaced frames, input above disparity; MP4: input | disparity per frame."""
    colours = colourise(depth, mask)  # one range over the clip
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


class PreviewSink:
    """The colourised disparity preview: keeps depth and mask (4 + 1 bytes per output pixel and frame) and
    decodes the input again at the end (``write_preview`` needs the clip-global disparity range)."""

    def __init__(self, path: Path, video: Path, opts: ProcessOptions) -> None:
        self.path, self.video, self.opts = path, video, opts
        self._depth: np.ndarray | None = None
        self._mask: np.ndarray | None = None
        self._fps = 0.0

    def begin(self, frames: int, height: int, width: int, fps: float) -> None:
        self._depth = np.empty((frames, height, width), np.float32)
        self._mask = np.empty((frames, height, width), bool)
        self._fps = fps

    def add(self, chunk: OutputChunk) -> None:
        assert self._depth is not None and self._mask is not None
        self._depth[chunk.start : chunk.start + len(chunk.depth)] = chunk.depth
        self._mask[chunk.start : chunk.start + len(chunk.mask)] = chunk.mask

    def end(self) -> None:
        assert self._depth is not None and self._mask is not None
        frames, _ = read_frames(self.video, stride=self.opts.stride, max_frames=self.opts.max_frames)
        write_preview(self.path, frames, self._depth, self._mask, self._fps)
        self._depth = self._mask = None

    def abort(self) -> None:
        self._depth = self._mask = None


def mcap_source_name(video: Path) -> str:
    """The topic prefix of a processed file: its stem, reduced to a source name's characters."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", video.stem)[:32]
    return name or "video"


def output_sinks(args: argparse.Namespace, opts: ProcessOptions) -> list[OutputSink]:
    """The outputs `geometryd process` writes: the npz or MCAP file, PLY frames, PNG depth frames, preview."""
    def colours() -> SourceColours:
        return SourceColours(args.video, opts.stride, opts.max_frames)

    out: list[OutputSink] = []
    if args.out is not None and args.out.suffix == ".mcap":
        out.append(McapSink(args.out, mcap_source_name(args.video), opts.stride, colours()))
    elif args.out is not None:
        out.append(NpzSink(args.out))
    if getattr(args, "ply_dir", None) is not None:
        out.append(PlySink(args.ply_dir, colours()))
    if args.png_depth is not None:
        out.append(PngDepthSink(args.png_depth))
    if args.preview is not None:
        out.append(PreviewSink(args.preview, args.video, opts))
    return out


def process_file(args: argparse.Namespace) -> int:
    """Decode ``args.video``, run priors and GeometryCrafter, write ``args.out`` (+ PNG depth / preview)."""
    opts = ProcessOptions.from_args(args)
    model_dir = Path(opts.model_dir)
    loaded: list[GeometryCrafter] = []

    def model() -> GeometryCrafter:
        if not loaded:
            import_jittor()
            loaded.append(GeometryCrafter.from_pretrained(model_dir, variant=opts.variant,
                                                          dtype=network_dtype(opts.dtype)))
        return loaded[0]

    with PriorClient(model_dir / "moge" / "model.pt", device=opts.device, python=opts.prior_python,
                     chunk=opts.decode_chunk) as priors:
        clip, timings = run_video(model, priors, args.video, opts, lambda _clip: output_sinks(args, opts),
                                  quiet=False)
    if opts.track_time:
        for name in ("prior", "encode", "denoise", "decode", "post"):
            if name in timings:
                print(f"Elapsed time for {name}: {timings[name] * 1e3:.1f} ms")
    summary = ", ".join(f"{k} {v:.2f} s" for k, v in timings.items())
    h0, w0 = clip.out
    target = args.out if args.out is not None else args.ply_dir
    log.info("wrote %s (%d frames %dx%d); %s", target, clip.t, w0, h0, summary)
    print(f"{target}: {clip.t} frames {w0}x{h0} ({summary})")
    return 0
