"""End-to-end CPU benchmark of the daemon on a generated clip (default 576x1024): `geometryd run` as a real
process with the real sidecar (tiny random-weight MoGe), shared-memory ring, windows and a real mosquitto.

Two modes, reported separately and never mixed:

- ``pipeline``: the whole tiny random-weight Jittor GeometryCrafter (``daemon.weights.tiny.make_tiny``) at the
  working size ``work_height x work_width`` (the clip is resized to it inside the pipeline);
- ``plumbing``: PLUMBING ONLY -- the geometry stage is the identity processor (result = prior,
  ``daemon.stages.geometry.IdentityGeometry``); it measures ingest, shm, sidecar, windows and MQTT, NOT
  the model.

Per mode: frames/s over the serving period (READY=1 -> exit; startup and warm-up are reported apart),
per-frame latency percentiles (decode -> published, measured by the daemon), peak RSS of the daemon's
process tree (daemon, geometry worker process, sidecar; sampled from /proc every 50 ms) and MQTT publish
counts.

    python bench/e2e_cpu.py [--modes pipeline,plumbing] [--frames 48] [--height 576 --width 1024]
Writes bench/results/e2e_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from daemon.broker import start_broker  # noqa: E402  (after the path fix for script use)
from daemon.config import write_config  # noqa: E402
from daemon.scenes import floor_wall_clip  # noqa: E402

MODES = ("pipeline", "plumbing")


@dataclass(frozen=True)
class E2EParams:
    frames: int = 48
    height: int = 576  # source clip size
    width: int = 1024
    work_height: int = 64  # pipeline working size (tiny model on 2 CPU cores)
    work_width: int = 128
    window: int = 16
    overlap: int = 4
    steps: int = 2
    variant: str = "diff"
    timeout_s: float = 900.0
    # 0: min(8, stride); the session decodes in chunks, so a chunk > stride delays output
    decode_chunk: int = 0
    # False: frames offered as fast as the daemon takes them (throughput; latency then includes queueing);
    # True: paced at the clip's 24 fps (latency of a live source)
    realtime: bool = False

    @property
    def decode_chunk_size(self) -> int:
        return self.decode_chunk or max(1, min(8, self.window - self.overlap))


def machine_info() -> dict[str, Any]:
    """CPU count, Python and package versions (Jittor's read from its package metadata: importing it is
    seconds of work and compiles nothing we need here)."""
    from importlib import metadata

    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform(), "machine": platform.machine(),
                            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "load_avg": [round(x, 2) for x in os.getloadavg()]}
    for dist in ("torch", "jittor", "numpy", "av", "diffusers"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                                     None)
    except OSError:
        info["cpu_model"] = None
    return info


# ---- process-tree RSS -----------------------------------------------------------------------------------

def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree_rss_bytes(root: int) -> int:
    """Sum of VmRSS over ``root`` and all its descendants (0 for processes that are gone)."""
    kids = _children_map()
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(kids.get(pid, []))
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


class RssSampler(threading.Thread):
    """Samples the tree RSS of ``pid`` until stopped; ``peak`` in bytes."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval_s, self.peak = pid, interval_s, 0
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.pid))
            self._stop_evt.wait(self.interval_s)

    def stop(self) -> int:
        self._stop_evt.set()
        self.join(5)
        return self.peak


# ---- one daemon run ------------------------------------------------------------------------------------

def config_tables(model_dir: Path, clip: Path, p: E2EParams, mqtt_port: int | None) -> dict[str, Any]:
    return {
        "model": {"dir": str(model_dir), "variant": p.variant, "dtype": "fp32"},
        "geometry": {"height": p.work_height, "width": p.work_width, "window_size": p.window,
                     "overlap": p.overlap, "steps": p.steps, "decode_chunk_size": p.decode_chunk_size},
        "prior": {"device": "cpu", "resolution_level": 0},
        "mqtt": {"enabled": mqtt_port is not None, "port": mqtt_port or 1883, "depth_encoding": "png16",
                 "publish_points": True, "qos": 0},
        "http": {"enabled": False},
        "logging": {"format": "json"},
        "daemon": {"watchdog_interval_s": 1.0},
        "sources": {"clip": {"type": "file", "path": str(clip), "realtime": p.realtime}},
    }


def _log_times(stderr: str) -> dict[str, float]:
    """Timestamps (s since epoch) of the startup milestones in the daemon's JSON log."""
    marks = {"pipeline loaded; warming up (compiles kernels)": "loaded", "warm-up done": "warm",
             "ready": "ready"}
    out: dict[str, float] = {}
    for line in stderr.splitlines():
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("logger") != "daemon.supervisor":
            continue  # the sidecar logs its own warm-up
        key = marks.get(rec.get("msg", ""))
        if key and key not in out:
            out[key] = float(rec["ts"])
    return out


def run_mode(label: str, p: E2EParams, work: Path, model_dir: Path, clip: Path) -> dict[str, Any]:
    """Run ``geometryd run --exit-when-done`` once; ``label`` is ``<mode>`` or ``<mode>-<tag>`` (e.g.
    ``plumbing-realtime``) with mode in :data:`MODES`. Returns the measured record."""
    mode = label.split("-", 1)[0]
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {label!r}")
    broker = start_broker(work)
    cfg = work / f"{label}.toml"
    write_config(cfg, config_tables(model_dir, clip, p, broker.port if broker else None))
    summary = work / f"{label}-summary.json"
    summary.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "daemon", "run", "--config", str(cfg), "--exit-when-done", "--summary",
           str(summary)]
    if mode == "plumbing":
        cmd += ["--plumbing-identity-delay", "0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    t_start = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    sampler = RssSampler(proc.pid)
    sampler.start()
    try:
        stdout, stderr = proc.communicate(timeout=p.timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    except BaseException:  # interrupted (SIGTERM -> SystemExit, Ctrl-C): stop the daemon, then re-raise
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    finally:
        peak = sampler.stop()
        if broker:
            broker.stop(10)
    t_end = time.time()
    (work / f"{label}.log").write_text(stderr)  # the daemon's JSON log, for inspection
    rec: dict[str, Any] = {"mode": label, "realtime": p.realtime,
                           "geometry": "tiny GeometryCrafter (random weights)" if mode == "pipeline"
                           else "IDENTITY (plumbing only: result = prior, no model)",
                           "returncode": proc.returncode, "mqtt_broker": bool(broker),
                           "wall_s_total": round(t_end - t_start, 3), "peak_rss_mib": round(peak / 2**20, 1)}
    if proc.returncode != 0 or not summary.exists():
        rec["error"] = (stdout[-1500:] + stderr[-3000:]).strip()
        return rec
    s = json.loads(summary.read_text())
    src = s["sources"]["clip"]
    marks = _log_times(stderr)
    ready = marks.get("ready", t_start)
    serving = max(t_end - ready, 1e-9)
    rec.update({
        "frames_in": src["frames_in"], "frames_out": src["frames_out"], "skipped": src["skipped"],
        "dropped": src["dropped"], "balanced": src["balanced"], "windows": src["windows"],
        "startup_s": round(ready - t_start, 3),
        "warm_up_s": round(marks["warm"] - marks["loaded"],
                           3) if {"warm", "loaded"} <= marks.keys() else None,
        "serving_s": round(serving, 3),
        "frames_per_s": round(src["frames_out"] / serving, 3),
        "latency_s": src["latency_s"], "loop_lag": s.get("loop_lag"), "mqtt": s.get("mqtt"),
    })
    return rec


def run_e2e(plan: dict[str, E2EParams], work: Path, model_dir: Path | None = None) -> list[dict[str, Any]]:
    """Generate the clips (and the tiny model unless given), then run each mode with its own parameters
    (the plumbing run is cheap and gets more frames than the CPU pipeline run)."""
    work.mkdir(parents=True, exist_ok=True)
    if model_dir is None:
        from daemon.weights.tiny import make_tiny

        model_dir = make_tiny((REPO / "var" / "tiny-model").resolve(), 0)
    runs = []
    for mode, p in plan.items():
        clip = work / f"clip-{p.frames}-{p.height}x{p.width}.mp4"
        if not clip.exists():
            tmp = clip.with_suffix(".tmp.mp4")
            floor_wall_clip(tmp, p.frames, p.height, p.width)
            tmp.rename(clip)
        rec = run_mode(mode, p, work, Path(model_dir).resolve(), clip)
        rec["params"] = {**asdict(p), "decode_chunk_size": p.decode_chunk_size}
        runs.append(rec)
        print(f"[e2e] {mode}: {rec.get('frames_per_s')} frames/s, latency {rec.get('latency_s')}, "
              f"peak RSS {rec.get('peak_rss_mib')} MiB{', ERROR' if 'error' in rec else ''}", flush=True)
    return runs


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so that the daemon and broker started here are stopped on the way out."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    d = E2EParams()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default=",".join(MODES))
    for name in ("frames", "height", "width", "work_height", "work_width", "window", "overlap", "steps"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    ap.add_argument("--variant", default=d.variant, choices=["diff", "determ"])
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "e2e_cpu.json")
    args = ap.parse_args(argv)
    p = E2EParams(args.frames, args.height, args.width, args.work_height, args.work_width, args.window,
                  args.overlap, args.steps, args.variant)
    runs = run_e2e({m: p for m in args.modes.split(",")}, REPO / "var" / "bench-e2e", args.model_dir)
    out = {"name": "e2e_cpu", "runs": runs, "machine": machine_info()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(runs, indent=1))
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
