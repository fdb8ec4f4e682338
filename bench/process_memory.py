"""Peak RSS of `geometryd process` on 3840x2160 clips of two lengths (issue #18): PyAV writes the clips, the
tiny model processes them at a small working size, /proc is sampled every 20 ms for the daemon process and its
MoGe sidecar. The streamed offline path (daemon/offline/run.py) should peak at about the same RSS for both
lengths: what grows per frame is the output mask (1 byte per source pixel) and the processing-size arrays.
Appends to bench/results/process_memory.json. Run: PYTHONPATH=. .venv/bin/python bench/process_memory.py"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def write_clip(path: Path, n: int, h: int, w: int) -> None:
    rng = np.random.default_rng(0)
    with av.open(str(path), mode="w") as c:
        st = c.add_stream("libx264", rate=Fraction(10))
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        st.options = {"preset": "ultrafast"}
        for _ in range(n):
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            for pkt in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def measure(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_main = peak_total = 0
    while p.poll() is None:
        main = _rss(p.pid)
        total = main + sum(_rss(c) for c in _children(p.pid))
        peak_main, peak_total = max(peak_main, main), max(peak_total, total)
        time.sleep(0.02)
    out = p.stdout.read() if p.stdout else ""
    if p.returncode != 0:
        raise SystemExit(f"process failed ({p.returncode}):\n{out[-3000:]}")
    return {"peak_rss_main_mib": peak_main / 2**20, "peak_rss_with_sidecar_mib": peak_total / 2**20,
            "wall_s": time.monotonic() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, nargs="+", default=[4, 12], help="clip lengths to measure")
    ap.add_argument("--work", type=Path, default=REPO / "var" / "bench-process-memory")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "process_memory.json")
    ap.add_argument("--label", default="")
    ap.add_argument("--window", type=int, default=0,
                    help="> 0: --window-size W --overlap 1 --decode-chunk-size W, so that clips longer "
                         "than W hold the networks' working set constant and only the clip's own growth "
                         "shows")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    from daemon.weights.tiny import make_tiny

    model = make_tiny(args.work / "tiny-model", seed=0)
    recs = []
    for n in args.frames:
        clip = args.work / f"uhd{n}.mp4"
        if not clip.exists():
            write_clip(clip, n, 2160, 3840)
        cmd = [sys.executable, "-m", "daemon", "process", str(clip), "--model-dir", str(model), "--out",
               str(args.work / "out.npz"), "--height", "128", "--width", "256", "--steps", "1",
               "--device", "cpu"]
        if args.window > 0:
            cmd += ["--window-size", str(args.window), "--overlap", "1",
                    "--decode-chunk-size", str(args.window)]
        rec = {"label": args.label, "frames": n, "size": "3840x2160", "work_size": "256x128",
               "window": args.window or "default (110, decode chunk 8)",
               "clip_decoded_mib": n * 2160 * 3840 * 3 / 2**20, "cpus": os.cpu_count(),
               **measure(cmd, dict(os.environ))}
        print(json.dumps(rec), flush=True)
        recs.append(rec)
    if len(recs) > 1:
        a, b = recs[0], recs[-1]
        per = (b["peak_rss_main_mib"] - a["peak_rss_main_mib"]) / (b["frames"] - a["frames"])
        print(f"main peak grows {per:.1f} MiB per frame ({a['frames']} -> {b['frames']} frames; "
              f"a decoded frame is {2160 * 3840 * 3 / 2**20:.1f} MiB)")
        recs[-1]["main_peak_growth_mib_per_frame"] = per
    args.out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(args.out.read_text()) if args.out.exists() else []
    args.out.write_text(json.dumps([*old, *recs], indent=1))


if __name__ == "__main__":
    main()
