"""PyAV helpers for whole files: read RGB frames (stride, length, optional resize), write a clip.

Matches run.py's reading (spec 4.1): every ``stride``-th frame, truncated to ``max_frames``; frames are RGB
uint8. The optional resize on read is antialiased bicubic (torch semantics, :mod:`daemon.model.resample`),
rounded back to uint8 — used only when a caller wants a smaller working copy; the pipeline itself resizes
in float. PyAV is imported inside the functions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from daemon.model import resample

log = logging.getLogger(__name__)


class VideoError(RuntimeError):
    """The file cannot be opened or decoded (message names the file)."""


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float
    frames: int  # from the container; 0 when unknown


def _video_stream(container: Any, path: str | Path) -> Any:
    if not container.streams.video:
        kinds = ", ".join(sorted({st.type for st in container.streams})) or "none"
        raise VideoError(f"{path} has no video stream (streams: {kinds})")
    return container.streams.video[0]


def probe(path: str | Path) -> VideoInfo:
    import av

    try:
        with av.open(str(path)) as container:
            stream = _video_stream(container, path)
            rate = stream.average_rate or stream.guessed_rate or 0
            ctx = stream.codec_context
            return VideoInfo(ctx.width, ctx.height, float(rate), int(stream.frames or 0))
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoError(f"cannot open video {path}: {exc}") from exc


def iter_frames(path: str | Path, stride: int = 1, max_frames: int = -1) -> Iterator[np.ndarray]:
    """Decode ``path`` one frame at a time: (H, W, 3) uint8 RGB, every ``stride``-th, at most ``max_frames``.
    Raises VideoError (one line) for a file without a video stream or a size change mid-stream."""
    import av

    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    n = 0
    size: tuple[int, int] | None = None
    try:
        with av.open(str(path)) as container:
            stream = _video_stream(container, path)
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i % stride:
                    continue
                if size is None:
                    size = (frame.width, frame.height)
                elif (frame.width, frame.height) != size:
                    raise VideoError(
                        f"{path}: frame {i} is {frame.width}x{frame.height} but the video started at "
                        f"{size[0]}x{size[1]}; a resolution change mid-stream is not supported "
                        "(re-encode the file at one size)")
                yield frame.to_ndarray(format="rgb24")
                n += 1
                if 0 < max_frames <= n:
                    return
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoError(f"cannot decode video {path}: {exc}") from exc


def read_frames(
    path: str | Path, stride: int = 1, max_frames: int = -1, size: tuple[int, int] | None = None
) -> tuple[np.ndarray, float]:
    """(T, H, W, 3) uint8 RGB frames and the source fps. ``size`` = (H, W) resizes each frame on read.

    Frames are decoded one at a time into one preallocated array (sized from the container's frame count,
    grown in blocks when that is unknown or wrong), so the peak is one copy of the clip, not a list of frames
    plus the stacked copy; with ``size`` each frame is resized as it arrives."""
    info = probe(path)
    expected = info.frames // stride + 1 if info.frames else 0
    if max_frames > 0:
        expected = min(expected, max_frames) if expected else max_frames
    out: np.ndarray | None = None
    t = 0
    for img in iter_frames(path, stride, max_frames):
        if size is not None and tuple(size) != img.shape[:2]:
            img = _resize_frame(img, (int(size[0]), int(size[1])))
        if out is None:
            out = np.empty((max(expected, 1), *img.shape), np.uint8)
        elif t == len(out):
            grown = np.empty((len(out) + max(16, len(out) // 4), *img.shape), np.uint8)
            grown[:t] = out
            out = grown
        out[t] = img
        t += 1
    if out is None or t == 0:
        raise VideoError(f"video {path} has no frames")
    out = out[:t]
    log.info("read %d frames %dx%d from %s", t, out.shape[2], out.shape[1], path)
    return out, info.fps


def _resize_frame(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    x = img.transpose(2, 0, 1)[None].astype(np.float32) / np.float32(255.0)
    x = np.clip(resample.resize(x, size, "bicubic_aa"), 0.0, 1.0)
    return np.round(x[0] * 255.0).astype(np.uint8).transpose(1, 2, 0)


def write_video(
    path: str | Path, frames: np.ndarray, fps: float = 10.0, codec: str = "libx264", crf: int = 18
) -> None:
    """Write (T, H, W, 3) uint8 RGB frames (even H and W for yuv420p) to an mp4/mkv file."""
    import av

    rate = Fraction(fps).limit_denominator(1000)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        assert isinstance(stream, av.VideoStream)
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
