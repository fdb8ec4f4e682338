"""MoGe prior rate (frames/s) on CPU, through the real sidecar process + FrameRing, and in-process to compare.

Configs (random weights, moge_sidecar/tiny.py): `tiny` (custom 4-block ViT/14, 0.4 M params) and `vits`
(stock DINOv2 ViT-S/14 backbone + 64/32-channel head, official trained_area_range [250000, 500000]).
Inputs: a small size and 576x1024. Note that MoGe first resizes every frame to the checkpoint's trained area
at the resolution level (pinned order, spec 4.2), so the network cost barely depends on the input size; the
input size shows up in the resize, the shm copy and the output resize / write.

    python bench/bench_prior.py [--configs tiny vits] [--sizes 192x320 576x1024] [--frames 8 --vits-frames 2]
Writes bench/results/prior.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine_info() -> dict[str, object]:
    import torch

    return {"cpu_count": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "numpy": np.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_avg": os.getloadavg()}


def _frames(n: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8).astype(int)
    return np.clip(base + rng.integers(-20, 21, (n, 1, 1, 3)), 0, 255).astype(np.uint8)


def bench_in_process(checkpoint: Path, frames: np.ndarray, chunk: int,
                     resolution_level: int) -> dict[str, float]:
    import torch

    from moge_sidecar.infer import frames_to_image, load_moge

    prior = load_moge(checkpoint, "cpu", resolution_level=resolution_level)
    prior(frames_to_image(torch.from_numpy(frames[:1])))  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(frames), chunk):
        prior(frames_to_image(torch.from_numpy(frames[i:i + chunk])))
    dt = time.perf_counter() - t0
    return {"frames_per_s": len(frames) / dt, "s_per_frame": dt / len(frames)}


async def _bench_sidecar(checkpoint: Path, frames: np.ndarray, chunk: int, resolution_level: int) -> dict:
    from daemon.config import PriorConfig
    from daemon.shm import FrameRing
    from daemon.stages.prior import PriorSidecar

    n, h, w, _ = frames.shape
    ring = FrameRing.create("benchprior", n, h, w)
    settings = PriorConfig(device="cpu", resolution_level=resolution_level, request_timeout_s=3600.0,
                           startup_timeout_s=600.0)
    try:
        t_start = time.perf_counter()
        async with PriorSidecar(settings, checkpoint, chunk=chunk) as sc:
            startup_s = time.perf_counter() - t_start
            refs = [ring.write_frame(f, i, 0.0) for i, f in enumerate(frames)]
            t0 = time.perf_counter()
            timing = await sc.compute(ring, refs)
            dt = time.perf_counter() - t0
            bytes_on_socket = sc.bytes_sent + sc.bytes_received
    finally:
        ring.close()
        ring.unlink()
    return {"frames_per_s": n / dt, "s_per_frame": dt / n, "startup_s": startup_s,
            "timing_ms": {k: v for k, v in timing.items() if k.endswith("_ms")},
            "socket_bytes_total": bytes_on_socket}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["tiny", "vits"], choices=["tiny", "vits"])
    ap.add_argument("--sizes", nargs="+", default=["192x320", "576x1024"])
    ap.add_argument("--frames", type=int, default=8, help="frames per run for the tiny config")
    ap.add_argument("--vits-frames", type=int, default=2, help="frames per run for the ViT-S config")
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--resolution-level", type=int, default=9)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prior.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from moge_sidecar.infer import area_range_of
    from moge_sidecar.tiny import CONFIGS, make_tiny_moge

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-prior-") as tmp:
        for kind in args.configs:
            ckpt = Path(tmp) / f"{kind}.pt"
            make_tiny_moge(ckpt, seed=0, kind=kind)
            lo, hi = area_range_of(CONFIGS[kind])
            for size in args.sizes:
                h, w = (int(v) for v in size.split("x"))
                n = args.frames if kind == "tiny" else args.vits_frames
                frames = _frames(n, h, w)
                level = args.resolution_level
                run = {"config": kind, "encoder": CONFIGS[kind]["encoder"], "height": h, "width": w,
                       "frames": n, "model_area": lo + (hi - lo) * level / 9,
                       "in_process": bench_in_process(ckpt, frames, args.chunk, level),
                       "sidecar": asyncio.run(_bench_sidecar(ckpt, frames, args.chunk, level))}
                print(json.dumps(run), flush=True)
                runs.append(run)
    result = {"name": "prior", "device": "cpu", "resolution_level": args.resolution_level,
              "chunk": args.chunk, "runs": runs, "machine": machine_info()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
