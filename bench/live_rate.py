"""Camera-rate latency of the daemon: a file source with ``realtime = true`` paced at the clip's fps, the tiny
random-weight model on the CPU, a real sidecar and mosquitto. Per profile: per-frame latency p50/p99 of the
preview tier and of the refined tier (ingest -> published, measured by the daemon), frames skipped by the
overload policy, the effective window frame rate. Profiles: the shipped window (110/25) and the
"low-latency" one (25/5, config.toml). Also runs ``geometryd demo`` (defaults) and records the two latency
lines it prints.

There is no torch counterpart of a daemon's latency, so no torch ratio here; the figure of merit is the
preview/refined ratio. On a shared CPU the absolute numbers move with the load.

    python -m bench.live_rate [--frames 360] [--fps 24] [--profiles shipped,low-latency] [--no-demo]
Writes bench/results/live_rate.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from daemon.broker import start_broker
from daemon.config import write_config
from daemon.scenes import floor_wall_clip
from daemon.wire.encoding import decode_depth

REPO = Path(__file__).resolve().parents[1]
PROFILES = {"shipped": (110, 25), "low-latency": (25, 5)}


class DepthCollector:
    """Every depth message (both tiers) of ``live/cam`` in a thread with its own event loop."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.depth: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        self.ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.ready.wait(15)

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        except asyncio.CancelledError:  # close()
            pass

    async def _main(self) -> None:
        import aiomqtt

        from daemon.wire.encoding import from_mqtt_properties
        from daemon.wire.subscribe import install_fast_properties_unpack

        install_fast_properties_unpack()
        self._stop = asyncio.Event()
        async with aiomqtt.Client("127.0.0.1", self.port, protocol=aiomqtt.ProtocolVersion.V5) as client:
            await client.subscribe("live/cam/depth", qos=0)
            await client.subscribe("live/cam/preview/depth", qos=0)
            self.ready.set()
            async for m in client.messages:
                user = from_mqtt_properties(m.properties)
                self.depth[(user["tier"], int(user["frame_index"]))] = decode_depth(bytes(m.payload), user)

    def close(self) -> None:
        for t in asyncio.all_tasks(self._loop):
            self._loop.call_soon_threadsafe(t.cancel)
        self._thread.join(5)

    def disagreement(self) -> dict[str, Any] | None:
        """Per frame with both tiers: |log(median preview depth / median refined depth)| (the units the scale
        rule controls) and the median relative per-pixel difference; p50/max over frames."""
        units, pix = [], []
        for (tier, idx), (dp, vp) in self.depth.items():
            if tier != "preview" or ("refined", idx) not in self.depth:
                continue
            dr, vr = self.depth[("refined", idx)]
            both = vp & vr & (dr > 0) & (dp > 0)
            if not both.any():
                continue
            units.append(abs(float(np.log(np.median(dp[both]) / np.median(dr[both])))))
            pix.append(float(np.median(np.abs(dp[both] - dr[both]) / dr[both])))
        if not units:
            return None
        return {"frames": len(units), "log_median_ratio_p50": float(np.median(units)),
                "log_median_ratio_max": float(np.max(units)), "pixel_rel_diff_p50": float(np.median(pix))}


def _config(model: Path, clip: Path, port: int | None, window: int, overlap: int, steps: int,
            realtime: bool = True) -> dict[str, Any]:
    return {
        "model": {"dir": str(model), "variant": "diff", "dtype": "fp32"},
        "geometry": {"height": 64, "width": 128, "window_size": window, "overlap": overlap, "steps": steps,
                     "decode_chunk_size": 8},
        "prior": {"device": "cpu", "resolution_level": 0},
        "mqtt": {"enabled": port is not None, "port": port or 1883, "qos": 0, "depth_encoding": "f16",
                 "topic_prefix": "live"},
        "http": {"enabled": False},
        "logging": {"level": "info"},
        "sources": {"cam": {"type": "file", "path": str(clip), "realtime": realtime}},
    }


def run_profile(work: Path, model: Path, clip: Path, window: int, overlap: int, steps: int,
                realtime: bool = True) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    broker = start_broker(work)
    collector = DepthCollector(broker.port) if broker else None
    try:
        cfg = work / "config.toml"
        write_config(cfg, _config(model, clip, broker.port if broker else None, window, overlap, steps,
                                  realtime))
        summary = work / "summary.json"
        t0 = time.monotonic()
        with open(work / "daemon.log", "w") as log:
            rc = subprocess.run([sys.executable, "-m", "daemon", "run", "--config", str(cfg),
                                 "--exit-when-done",
                                 "--summary", str(summary)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                timeout=1800).returncode
        wall = time.monotonic() - t0
        time.sleep(0.5)
    finally:
        if collector is not None:
            collector.close()
        if broker is not None:
            broker.stop(10)
    if rc != 0:
        raise RuntimeError(f"daemon failed ({rc}); log: {work / 'daemon.log'}")
    src = json.loads(summary.read_text())["sources"]["cam"]
    pv = src["previews"]
    return {"window_size": window, "overlap": overlap, "steps": steps, "wall_s": round(wall, 1),
            "frames_in": src["frames_in"], "frames_out": src["frames_out"], "skipped": src["skipped"],
            "dropped": src["dropped"], "balanced": src["balanced"], "window_fps_last": src.get("window_fps"),
            "refined_latency_s": src["latency_s"], "preview_latency_s": pv["latency_s"],
            "previews": {k: pv[k] for k in ("in", "out", "dropped", "balanced")},
            "preview_vs_refined": collector.disagreement() if collector is not None else None}


def run_demo(work: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "daemon", "demo", "--workdir", str(work)], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    lines = {k: next((ln for ln in proc.stdout.splitlines() if ln.startswith(f"[demo] {k} latency")), "")
             for k in ("preview", "refined")}
    p50 = {k: float(re.search(r"p50 ([0-9.]+) s",
                              v).group(1)) for k, v in lines.items()}  # type: ignore[union-attr]
    return {"lines": lines, "preview_p50_s": p50["preview"], "refined_p50_s": p50["refined"],
            "refined_over_preview": p50["refined"] / max(p50["preview"], 1e-9)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=360)
    ap.add_argument("--fps", type=int, default=24)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--profiles", default="low-latency,shipped")
    ap.add_argument("--no-demo", action="store_true")
    ap.add_argument("--workdir", default="var/bench-live")
    args = ap.parse_args(argv)
    from daemon.weights.tiny import make_tiny

    work = (REPO / args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = (REPO / "var/tiny-model").resolve()
    make_tiny(model, 0)
    clip = work / f"clip_{args.frames}_{args.fps}.mp4"
    if not clip.exists():
        floor_wall_clip(clip, args.frames, 128, 256, fps=args.fps)
    out: dict[str, Any] = {"clip": {"frames": args.frames, "fps": args.fps, "size": [128, 256]},
                           "machine": {"cpus": os.cpu_count(), "note": "shared with other jobs",
                                       "loadavg_at_start": os.getloadavg(),
                                       "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                           "profiles": {}}
    dest = REPO / "bench" / "results" / "live_rate.json"

    def save() -> None:  # after every run: a long profile must not lose the others
        out["machine"]["loadavg_at_end"] = os.getloadavg()
        dest.write_text(json.dumps(out, indent=1))

    if not args.no_demo:
        out["demo"] = run_demo(work / "demo")
        print("\n".join(out["demo"]["lines"].values()), flush=True)
        save()
        # the demo's clip and settings (32 frames, window 16/4, 2 steps, not paced): units disagreement
        demo_clip = work / "demo_clip.mp4"
        if not demo_clip.exists():
            floor_wall_clip(demo_clip, 32, 128, 256)
        out["demo_clip_disagreement"] = run_profile(work / "demo-clip", model, demo_clip, 16, 4, 2,
                                                    realtime=False)
        print(f"demo clip preview vs refined: {out['demo_clip_disagreement']['preview_vs_refined']}",
              flush=True)
        save()
    for name in [p for p in args.profiles.split(",") if p]:
        w, o = PROFILES[name]
        out["profiles"][name] = run_profile(work / name, model, clip, w, o, args.steps)
        r = out["profiles"][name]
        print(f"{name:12s} window {w}/{o}: preview p50 {r['preview_latency_s']['p50']:.3f} s "
              f"p99 {r['preview_latency_s']['p99']:.3f} s | "
              f"refined p50 {r['refined_latency_s']['p50']:.2f} s "
              f"p99 {r['refined_latency_s']['p99']:.2f} s | in {r['frames_in']} out {r['frames_out']} "
              f"skipped {r['skipped']}", flush=True)
        save()
    print(f"-> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
