"""Daemon benchmark: one file source through `geometryd run --exit-when-done` (real sidecar, shm, MQTT broker).

Measures wall time, frames/s, per-frame decode->publish latency and the event-loop lag, overall and while
the geometry worker thread is busy. Two modes:

- ``pipeline``: the real Jittor GeometryCrafter (tiny random weights unless --model-dir points at real ones);
- ``plumbing``: the PLUMBING-ONLY identity processor (result = prior) -- it measures the daemon's own
  overhead (ingest, ring, sidecar, windows, publish), NOT the model.

    python bench/bench_daemon.py [--modes pipeline,plumbing] [--frames 96] [--height 64 --width 128]

Writes bench/results/daemon.json (machine info included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def machine_info() -> dict[str, object]:
    info: dict[str, object] = {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                               "platform": platform.platform(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                            time.gmtime())}
    for mod in ("torch", "jittor", "numpy", "av"):
        try:
            out = subprocess.run([sys.executable, "-c", f"import {mod}; print({mod}.__version__)"],
                                 capture_output=True, text=True, timeout=300,
                                 env={**os.environ, "nvcc_path": "", "use_mkl": "0", "log_silent": "1"})
            info[mod] = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            info[mod] = None
    return info


def run_mode(mode: str, args: argparse.Namespace, work: Path, model_dir: Path) -> dict[str, object]:
    from daemon.demo import start_mosquitto

    clip = work / "clip.mp4"
    broker = start_mosquitto(work)
    cfg = work / f"{mode}.toml"
    cfg.write_text(f"""[model]
dir = "{model_dir}"
dtype = "fp32"
[geometry]
height = {args.height}
width = {args.width}
window_size = {args.window}
overlap = {args.overlap}
steps = {args.steps}
decode_chunk_size = 8
[prior]
device = "auto"
resolution_level = 0
[mqtt]
enabled = {"true" if broker else "false"}
port = {broker[1] if broker else 1883}
depth_encoding = "f16"
[http]
enabled = false
[daemon]
watchdog_interval_s = 1.0
[sources.clip]
type = "file"
path = "{clip}"
""")
    summary = work / f"{mode}-summary.json"
    cmd = [sys.executable, "-m", "daemon", "run", "--config", str(cfg), "--exit-when-done", "--summary", str(summary)]
    if mode == "plumbing":
        cmd += ["--plumbing-identity-delay", "0"]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    finally:
        if broker:
            broker[0].terminate()
            broker[0].wait(10)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        return {"mode": mode, "error": proc.stdout[-2000:] + proc.stderr[-2000:]}
    s = json.loads(summary.read_text())
    src = s["sources"]["clip"]
    # startup (sidecar + pipeline load + warm-up) is in the log; steady-state throughput excludes it
    ready_at = None
    for line in proc.stderr.splitlines() + proc.stdout.splitlines():
        if "daemon.supervisor: ready" in line:
            ready_at = line.split(" ")[0]
    return {"mode": mode, "frames": src["frames_out"], "wall_s_total": round(wall, 2),
            "latency_s": src["latency_s"], "loop_lag": s["loop_lag"], "mqtt": s.get("mqtt"),
            "balanced": src["balanced"], "ready_log_time": ready_at}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="pipeline,plumbing")
    ap.add_argument("--frames", type=int, default=96)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--overlap", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "daemon.json"))
    args = ap.parse_args()

    from daemon.demo import synthetic_clip

    work = REPO / "var" / "bench-daemon"
    work.mkdir(parents=True, exist_ok=True)
    synthetic_clip(work / "clip.mp4", args.frames, args.height, args.width)
    if args.model_dir:
        model_dir = Path(args.model_dir).resolve()
    else:
        from daemon.tiny import make_tiny

        model_dir = (REPO / "var" / "tiny-model").resolve()
        make_tiny(model_dir, 0)
    results = [run_mode(m, args, work, model_dir) for m in args.modes.split(",")]
    out = {"bench": "daemon", "machine": machine_info(), "config": vars(args), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
