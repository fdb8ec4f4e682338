"""The records that travel through the daemon, in the order a frame meets them.

:class:`IngestFrame` (an ingest's decoded frame) -> :class:`FrameMeta` (an admitted frame's bookkeeping while
its pixels sit in the shared-memory ring) -> :class:`FrameResult` (one output frame of a stream, what the
publishers send).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class IngestFrame:
    """One decoded frame as an ingest yields it."""

    image: np.ndarray  # (H, W, 3) uint8 RGB at the processing size
    pts: float  # seconds on the source's timeline (continues across loops/reconnects)
    t_ingest: float  # time.monotonic() when the frame was decoded (end-to-end latency origin)
    source_size: tuple[int, int] = (0, 0)  # (H, W) as decoded, before the resize (0, 0: unknown)


@dataclass
class FrameMeta:
    """An admitted frame's bookkeeping while its pixels sit in the ring."""

    seq: int  # position among admitted frames of this source (what the pipeline sees as frame index)
    frame_index: int  # the source's own frame number (published)
    pts: float
    t_ingest: float
    window_fps: float = 0.0  # effective source frame rate of the window this frame entered as new (pts)


@dataclass
class FrameResult:
    """One final output frame of a stream (what ``StreamingSession`` returns, daemon/pipeline.py).

    ``intrinsics`` = (fx, fy, cx, cy) normalised by the output width/height with pixel centres at
    ``(u + 0.5) / W``: ``u_n = cx + fx * X / Z``, ``v_n = cy + fy * Y / Z`` (cx = cy = 0.5 when estimated;
    a source's known intrinsics are converted to this form by :mod:`daemon.intrinsics`).
    """

    frame_index: int
    window_id: int
    point_map: np.ndarray  # (H0, W0, 3) float32
    depth: np.ndarray  # (H0, W0) float32
    mask: np.ndarray  # (H0, W0) bool
    intrinsics: tuple[float, float, float, float]
    prior_scale: float = 1.0  # s the frame's prior was normalised with: depth * prior_scale = prior units
    units: str = "relative"  # "metric": point map and depth in metres (geometry.metric, a MoGe-2 prior)
    metric_scale: float = 1.0  # the factor the relative output was multiplied by (1.0 when relative)
