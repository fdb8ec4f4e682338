"""Shared pieces of the GPU benchmark (bench/gpu/run.sh): network configs, the run plan, the time budget,
timing and device-memory helpers. Imports only the standard library at module level: it is used both by
the PyTorch process (numpy 2) and by the Jittor process (numpy 1.26 from its own --target dir).

Official configs: ../shared/spec/geometrycrafter.md section 1.2 (values of the SVD-xt UNet / VAE / CLIP
and the point-map VAE); ``--dry-run-cpu`` uses the tiny configs of daemon/weights/configs.py instead.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from daemon.weights.configs import (  # noqa: E402  (after the path fix: run as a script on the GPU machine)
    OFFICIAL_CLIP_VISION,
    OFFICIAL_SVD_VAE,
    OFFICIAL_UNET,
)

# Prior substitute: a DINOv2-ViT-L/14-shaped encoder (24 x 1024 wide, 16 heads, MLP 4096) at MoGe's token
# count (trained area 500000 px at resolution level 9, spec 4.2); MoGe's conv head is not included.
VITL: dict[str, int] = {"dim": 1024, "depth": 24, "heads": 16, "mlp": 4096, "area": 500_000}
VIT_TINY: dict[str, int] = {"dim": 64, "depth": 2, "heads": 2, "mlp": 128, "area": 196 * 36}


@dataclass(frozen=True)
class Plan:
    """What one benchmark run measures. ``frames`` is the window length used for the stage and end-to-end
    timings (upstream uses 110-frame windows; fewer frames keep the run inside the 10-minute limit)."""

    dry_run_cpu: bool
    sizes: tuple[tuple[int, int], ...]
    frames: int
    chunk: int  # decode_chunk_size (encoders and decoder run on chunks of this many frames)
    steps: int  # diffusion steps (diff variant)
    reps: int  # timed repetitions after the warm-up call
    attn_cases: tuple[tuple[str, int, int, int], ...]  # (name, N = batch*heads, L = Lq = Lk, head dim)
    variants: tuple[str, ...] = ("diff", "determ")
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run_cpu else "cuda"

    @property
    def dtype(self) -> str:
        """UNet and CLIP precision (spec 1.3: fp16 on GPU); the VAEs always run fp32."""
        return "fp32" if self.dry_run_cpu else "fp16"


def make_plan(dry_run_cpu: bool) -> Plan:
    if dry_run_cpu:
        return Plan(True, ((64, 128),), frames=4, chunk=2, steps=2, reps=1,
                    attn_cases=(("spatial", 4, 96, 64), ("temporal", 32, 11, 64)))
    # spatial: 16 frames x 5 heads over 48x80 = 3840 tokens (first UNet level at 384x640);
    # temporal: 3840 tokens x 5 heads over 110 frames.
    return Plan(False, ((384, 640), (576, 1024)), frames=25, chunk=8, steps=5, reps=2,
                attn_cases=(("spatial_3840x64", 80, 3840, 64), ("temporal_110x64", 3840 * 5, 110, 64)))


def plan_from_env() -> Plan:
    """The plan, with optional overrides for a follow-up session: GD_BENCH_FRAMES=25,
    GD_BENCH_SIZES=384x640,576x1024, GD_BENCH_VARIANTS=diff,determ, GD_BENCH_STEPS=5."""
    plan = make_plan(os.environ.get("GD_BENCH_DRY_RUN_CPU") == "1")
    over: dict[str, Any] = {}
    if os.environ.get("GD_BENCH_FRAMES"):
        over["frames"] = int(os.environ["GD_BENCH_FRAMES"])
    if os.environ.get("GD_BENCH_STEPS"):
        over["steps"] = int(os.environ["GD_BENCH_STEPS"])
    if os.environ.get("GD_BENCH_SIZES"):
        sizes = os.environ["GD_BENCH_SIZES"].split(",")
        over["sizes"] = tuple(tuple(int(v) for v in s.split("x")) for s in sizes)
    if os.environ.get("GD_BENCH_VARIANTS"):
        over["variants"] = tuple(os.environ["GD_BENCH_VARIANTS"].split(","))
    return Plan(**{**asdict(plan), **over}) if over else plan


def unet_config(plan: Plan) -> dict[str, Any]:
    if plan.dry_run_cpu:
        from daemon.weights.configs import TINY_UNET

        return dict(TINY_UNET)
    return dict(OFFICIAL_UNET)


def svd_vae_config(plan: Plan) -> dict[str, Any]:
    if plan.dry_run_cpu:
        from daemon.weights.configs import TINY_SVD_VAE

        return dict(TINY_SVD_VAE)
    return dict(OFFICIAL_SVD_VAE)


def clip_config(plan: Plan) -> dict[str, Any]:
    if plan.dry_run_cpu:
        from daemon.weights.configs import TINY_CLIP_VISION

        return dict(TINY_CLIP_VISION)
    return dict(OFFICIAL_CLIP_VISION)


def point_map_vae_config(plan: Plan) -> dict[str, Any]:
    from daemon.weights.configs import OFFICIAL_POINT_MAP_VAE, TINY_POINT_MAP_VAE

    return dict(TINY_POINT_MAP_VAE if plan.dry_run_cpu else OFFICIAL_POINT_MAP_VAE)


def vit_config(plan: Plan) -> dict[str, int]:
    return dict(VIT_TINY if plan.dry_run_cpu else VITL)


def moge_tokens(height: int, width: int, area: int) -> tuple[int, int]:
    """Token grid of MoGe's resize to ``area`` pixels at the frame's aspect ratio (patch 14)."""
    import math

    scale = math.sqrt(area / (height * width))
    return max(1, int(height * scale) // 14), max(1, int(width * scale) // 14)


# ---- time budget -----------------------------------------------------------------------------------------

class Budget:
    """Deadline from the environment (GD_BENCH_DEADLINE, epoch seconds); items that would start with less
    than ``min_left`` seconds left are skipped and recorded as such."""

    def __init__(self, deadline: float | None = None) -> None:
        env = os.environ.get("GD_BENCH_DEADLINE")
        self.deadline = deadline if deadline is not None else (float(env) if env else time.time() + 3600)
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.deadline - time.time()

    def allow(self, name: str, min_left: float) -> bool:
        if self.left() >= min_left:
            return True
        self.skipped.append(f"{name} (budget: {self.left():.0f} s left, needs ~{min_left:.0f} s)")
        print(f"[bench] SKIP {name}: {self.left():.0f} s left", flush=True)
        return False


# ---- timing and memory -------------------------------------------------------------------------------

def timed(fn: Callable[[], Any], sync: Callable[[], None], reps: int) -> dict[str, float]:
    """First call (compile / autotune / allocate) timed apart from ``reps`` steady calls (median)."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"first_s": round(first, 5), "median_s": round(statistics.median(times), 5), "reps": len(times)}


class NvmlPeak(threading.Thread):
    """Peak device memory in use (NVML, whole device: includes the CUDA context and allocator caches),
    sampled every 20 ms; ``None`` when NVML is unavailable (CPU dry run)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_mib: float | None = None
        self._halt = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._h = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
        except Exception:  # noqa: BLE001 - no NVML (CPU, or package absent)
            self._nvml = None

    def run(self) -> None:
        if self._nvml is None:
            return
        while not self._halt.is_set():
            used = self._nvml.nvmlDeviceGetMemoryInfo(self._h).used / 2**20
            self.peak_mib = used if self.peak_mib is None else max(self.peak_mib, used)
            self._halt.wait(0.02)

    def reset(self) -> None:
        self.peak_mib = None

    def stop(self) -> float | None:
        self._halt.set()
        return self.peak_mib


def gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def machine_info() -> dict[str, Any]:
    return {"cpu_count": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "gpu": gpu_name(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)
