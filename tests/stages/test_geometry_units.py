"""daemon/stages/geometry.py without a worker process: ``geometry.low_memory`` reaches the streaming session."""

from __future__ import annotations

import pytest

from daemon.config import GeometryConfig, StreamingConfig
from daemon.pipeline import GeometryCrafter
from daemon.stages.geometry import PipelineGeometry
from daemon.weights.tiny import CLIP_MEAN, CLIP_STD, SCHEDULER_CONFIG


@pytest.mark.parametrize("low_memory", [True, False])
def test_low_memory_reaches_the_streaming_session(low_memory: bool) -> None:
    gc = GeometryCrafter(unet=None, svd_vae=None, point_map_vae=None, clip=None,
                         scheduler_config=dict(SCHEDULER_CONFIG), clip_mean=CLIP_MEAN, clip_std=CLIP_STD,
                         variant="diff", dtype="fp32")
    gc.low_memory_usage = not low_memory
    proc = PipelineGeometry.__new__(PipelineGeometry)  # no model load: the networks are not needed here
    proc.gc = gc
    proc.geometry = GeometryConfig(height=64, width=128, window_size=8, overlap=2, steps=1, decode_chunk_size=4,
                                   low_memory=low_memory)
    proc.streaming = StreamingConfig()
    session = proc.new_session()
    assert session.gc.low_memory_usage is low_memory
