"""The options of an offline run (`geometryd process`, `geometryd batch`): one typed place for their defaults.

The argparse front ends take their defaults from :class:`ProcessOptions` (daemon/commands/process.py,
daemon/commands/batch.py); the names and defaults are run.py's (spec 4.1).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

from daemon.weights.tiny import missing_parts


class UsageError(ValueError):
    """Bad arguments or inputs (exit 2)."""


@dataclasses.dataclass(frozen=True)
class ProcessOptions:
    """How one video is processed (same meaning as run.py's keywords of the same name)."""

    model_dir: str = ""
    variant: str = "diff"  # run.py model_type
    height: int = 0  # processing size, multiples of 64; 0 = the source size
    width: int = 0
    downsample_ratio: float = 1.0
    window: int = 110  # window_size
    overlap: int = 25
    steps: int = 5  # num_inference_steps
    guidance_scale: float = 1.0
    decode_chunk: int = 8  # decode_chunk_size
    stride: int = 1  # process_stride
    max_frames: int = -1  # process_length
    seed: int = 42
    force_projection: bool = True
    force_fixed_focal: bool = True
    use_extract_interp: bool = False
    track_time: bool = False
    low_memory: bool = False  # low_memory_usage
    dtype: str = "auto"  # network precision: auto | fp16 | fp32
    device: str = "auto"  # device of the MoGe prior
    prior_python: str = ""  # interpreter of the MoGe sidecar ("" = this one)
    intrinsics: tuple[float, ...] | None = None  # known fx, fy, cx, cy in pixels of the source size

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ProcessOptions:
        """The fields present in ``args`` (argparse dests use the field names); the rest keep their
        defaults."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                  if hasattr(args, f.name)}
        values["model_dir"] = str(values.get("model_dir", ""))
        return cls(**values)

    def check(self) -> None:
        """Raise :class:`UsageError` naming the first bad value (flag names of `geometryd process`)."""
        flags = {"window": "--window-size", "decode_chunk": "--decode-chunk-size",
                 "stride": "--process-stride", "steps": "--num-inference-steps"}
        for name, flag in flags.items():
            if getattr(self, name) < 1:
                raise UsageError(f"{flag} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.overlap < self.window:
            raise UsageError(f"--overlap must be in [0, --window-size) = [0, {self.window}), "
                             f"got {self.overlap}")
        if self.max_frames == 0 or self.max_frames < -1:
            raise UsageError(f"--process-length must be -1 (all) or >= 1, got {self.max_frames}")
        if not math.isfinite(self.guidance_scale):
            raise UsageError(f"--guidance-scale must be a finite number, got {self.guidance_scale}")
        if not (math.isfinite(self.downsample_ratio) and self.downsample_ratio > 0):
            raise UsageError(f"--downsample-ratio must be a positive number, got {self.downsample_ratio}")
        if (self.height > 0) != (self.width > 0):
            raise UsageError("give both --height and --width, or neither")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v < 0 or v % 64:
                raise UsageError(f"--{name} must be a positive multiple of 64, got {v}")


def check_model_parts(model_dir: Path, variant: str) -> None:
    """Raise :class:`UsageError` naming the parts an offline run of ``variant`` needs that ``model_dir``
    lacks."""
    need = {f"unet_{variant}", "point_map_vae", "vae", "image_encoder", "feature_extractor", "scheduler",
            "moge"}
    missing = sorted(need & set(missing_parts(model_dir)))
    if missing:
        raise UsageError(f"model folder {model_dir} is missing: {', '.join(p + '/' for p in missing)}")


DEFAULTS = ProcessOptions()
