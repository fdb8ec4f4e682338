"""PyAV helpers for whole files: read RGB frames (stride, length, optional resize), write a clip.

Matches run.py's reading (spec 4.1): every ``stride``-th frame, truncated to ``max_frames``; frames are RGB
uint8. The optional resize on read is antialiased bicubic (torch semantics, :mod:`daemon.resample`),
rounded back to uint8 — used only when a caller wants a smaller working copy; the pipeline itself resizes
in float. PyAV is imported inside the functions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class VideoError(RuntimeError):
    """The file cannot be opened or decoded (message names the file)."""


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float
    frames: int  # from the container; 0 when unknown


def probe(path: str | Path) -> VideoInfo:
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or 0
            ctx = stream.codec_context
            return VideoInfo(ctx.width, ctx.height, float(rate), int(stream.frames or 0))
    except (av.error.FFmpegError, IndexError, OSError) as exc:
        raise VideoError(f"cannot open video {path}: {exc}") from exc


def read_frames(
    path: str | Path, stride: int = 1, max_frames: int = -1, size: tuple[int, int] | None = None
) -> tuple[np.ndarray, float]:
    """(T, H, W, 3) uint8 RGB frames and the source fps. ``size`` = (H, W) resizes each frame on read."""
    import av

    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            for i, frame in enumerate(container.decode(stream)):
                if i % stride:
                    continue
                frames.append(frame.to_ndarray(format="rgb24"))
                if 0 < max_frames <= len(frames):
                    break
    except (av.error.FFmpegError, IndexError, OSError) as exc:
        raise VideoError(f"cannot decode video {path}: {exc}") from exc
    if not frames:
        raise VideoError(f"video {path} has no frames")
    out = np.stack(frames)
    if size is not None and tuple(size) != out.shape[1:3]:
        from daemon import resample

        x = out.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
        x = np.clip(resample.resize(x, tuple(size), "bicubic_aa"), 0.0, 1.0)
        out = np.round(x * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)
    log.info("read %d frames %dx%d from %s", out.shape[0], out.shape[2], out.shape[1], path)
    return np.ascontiguousarray(out), fps


def write_video(
    path: str | Path, frames: np.ndarray, fps: float = 10.0, codec: str = "libx264", crf: int = 18
) -> None:
    """Write (T, H, W, 3) uint8 RGB frames (even H and W for yuv420p) to an mp4/mkv file."""
    import av
    from fractions import Fraction

    rate = Fraction(fps).limit_denominator(1000)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf)}
        for img in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
