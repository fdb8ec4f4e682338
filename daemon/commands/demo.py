"""`geometryd demo`: the whole product on this machine in a few minutes, with no weights and no setup.

1. writes a synthetic sample clip (PyAV, a moving scene) into the work folder;
2. builds (or reuses) a tiny random-weight model folder (``daemon.weights.tiny.make_tiny``);
3. starts a local mosquitto on a free port when it is installed (otherwise the file sink is used);
4. runs ``geometryd run --exit-when-done`` on the clip (a real daemon process with its MoGe sidecar, shared
   memory and the Jittor pipeline on the CPU) with a config written to the work folder;
5. subscribes (``daemon.wire.subscribe.iter_frames``) and prints one line per received frame;
6. writes a colourised depth preview (PNG contact sheet + MP4) and says what the numbers mean.

Random weights make no real prediction: the point is the plumbing. Real weights: ``geometryd weights pull
--to DIR`` then ``geometryd demo --model-dir DIR`` (a GPU is strongly advised at real sizes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from daemon.broker import start_broker
from daemon.config import write_config
from daemon.depth_colour import colourise
from daemon.scenes import floor_wall_clip
from daemon.weights.tiny import make_tiny
from daemon.wire.subscribe import iter_frames

NOTICE = (
    "NOTE: the tiny model has RANDOM weights - the depth maps above are not a prediction, they show that\n"
    "      every stage runs (decode -> shared memory -> MoGe sidecar -> Jittor GeometryCrafter -> MQTT).\n"
    "      Official weights: `geometryd weights pull --to /var/lib/geometryd/model`, then\n"
    "      `geometryd demo --model-dir /var/lib/geometryd/model` (or set model.dir in config.toml)."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="end-to-end demo on a generated clip (no weights needed)",
                              description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--workdir", default="var/demo", help="where the clip, config and previews go (var/demo)")
    p.add_argument("--model-dir", default=None,
                   help="model folder in the official layout (default: build a tiny random one in "
                        "var/tiny-model)")
    p.add_argument("--frames", type=int, default=32, help="frames in the generated clip (32)")
    p.add_argument("--height", type=int, default=64, help="processing height, multiple of 64 (64)")
    p.add_argument("--width", type=int, default=128, help="processing width, multiple of 64 (128)")
    p.add_argument("--window", type=int, default=16, help="window size in frames (16)")
    p.add_argument("--overlap", type=int, default=4, help="window overlap in frames (4)")
    p.add_argument("--steps", type=int, default=2, help="denoising steps (2)")
    p.add_argument("--no-mqtt", action="store_true",
                   help="use the file sink even when mosquitto is installed")
    p.set_defaults(func=_cmd_demo)


# ---- colour preview --------------------------------------------------------------------------------------

def write_previews(frames: dict[int, Any], clip: Path, out_dir: Path) -> list[Path]:
    """PNG contact sheet (input | depth for up to 8 frames) and an MP4 of the depth sequence."""
    import av

    if not frames:
        return []
    order = sorted(frames)
    colours = dict(zip(order, colourise(np.stack([frames[i].depth for i in order]),
                                        np.stack([frames[i].depth_valid for i in order])), strict=True))
    h, w = frames[order[0]].depth.shape
    inputs: dict[int, Any] = {}
    with av.open(str(clip)) as c:
        for i, f in enumerate(c.decode(video=0)):
            inputs[i] = f.to_ndarray(format="rgb24", width=w, height=h)
    pick = order[:: max(1, len(order) // 8)][:8]
    rows = [np.concatenate([inputs.get(i, np.zeros((h, w, 3), np.uint8)),
                            colours[i]], 1) for i in pick]
    sheet = out_dir / "depth_preview.png"
    Image.fromarray(np.concatenate(rows, 0)).save(sheet)
    mp4 = out_dir / "depth_preview.mp4"
    with av.open(str(mp4), "w") as out:
        s = out.add_stream("mpeg4", rate=12)
        s.width, s.height, s.pix_fmt, s.bit_rate = 2 * w, h, "yuv420p", 2_000_000
        for i in order:
            img = np.concatenate([inputs.get(i, np.zeros((h, w, 3), np.uint8)), colours[i]], 1)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return [sheet, mp4]


# ---- the demo --------------------------------------------------------------------------------------------

def _config_tables(model_dir: Path, clip: Path, args: argparse.Namespace, mqtt_port: int | None,
                   out_dir: Path) -> dict[str, Any]:
    return {
        "model": {"dir": str(model_dir), "variant": "diff", "dtype": "fp32"},
        "geometry": {"height": args.height, "width": args.width, "window_size": args.window,
                     "overlap": args.overlap, "steps": args.steps, "decode_chunk_size": 8},
        "prior": {"device": "auto", "resolution_level": 0},
        "mqtt": {"enabled": mqtt_port is not None, "port": mqtt_port or 1883, "qos": 1,
                 "depth_encoding": "f16", "topic_prefix": "demo"},
        "files": {"enabled": True, "dir": str(out_dir), "npz": "clip"},
        "http": {"enabled": False},
        "logging": {"level": "info"},
        "sources": {"sample": {"type": "file", "path": str(clip)}},
    }


def _cmd_demo(args: argparse.Namespace) -> int:
    model_dir = Path(args.model_dir).resolve() if args.model_dir else None
    if model_dir is None:
        # On the main thread, before the event loop: Jittor's compile pool must belong to the main thread
        # (see daemon.jittor_env.import_jittor), and nothing else runs yet.

        model_dir = Path("var/tiny-model").resolve()
        _say(f"tiny random-weight model -> {model_dir} (built once, reused)")
        make_tiny(model_dir, 0)
    return asyncio.run(_demo(args, model_dir))


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


async def _demo(args: argparse.Namespace, model_dir: Path) -> int:
    t_start = time.monotonic()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    clip = workdir / "sample.mp4"
    if not clip.exists():
        _say(f"writing a {args.frames}-frame synthetic clip -> {clip}")
        await asyncio.to_thread(floor_wall_clip, clip, args.frames, 2 * args.height, 2 * args.width)
    broker = None if args.no_mqtt else start_broker(workdir)
    out_dir = workdir / "out"
    shutil.rmtree(out_dir, ignore_errors=True)
    if broker is None:
        _say("mosquitto not available: results go to the file sink only")
    else:
        _say(f"local mosquitto on 127.0.0.1:{broker.port}")
    cfg = workdir / "config.toml"
    write_config(cfg, _config_tables(model_dir, clip, args, broker.port if broker else None, out_dir))
    summary_path = workdir / "summary.json"
    received: dict[int, Any] = {}
    sub_task = None
    try:
        if broker is not None:
            sub_task, ready = await _start_subscriber(broker.port, received)
            await asyncio.wait_for(ready.wait(), 15)
        _say(f"starting the daemon: geometryd run --config {cfg} --exit-when-done")
        rc = await _run_daemon(cfg, summary_path, workdir / "daemon.log")
        await asyncio.sleep(0.5)  # last messages in flight
    finally:
        if sub_task is not None:
            sub_task.cancel()
            await asyncio.gather(sub_task, return_exceptions=True)
        if broker is not None:
            broker.stop(10)
    if rc != 0:
        _say(f"the daemon failed (exit {rc}); its log: {workdir / 'daemon.log'}")
        print((workdir / "daemon.log").read_text()[-3000:], file=sys.stderr)
        return 1
    if not received:  # no broker: read the file sink back
        received = _frames_from_npz(out_dir / "sample" / "clip.npz")
    summary = json.loads(summary_path.read_text())
    src = summary["sources"]["sample"]
    previews = await asyncio.to_thread(write_previews, received, clip, workdir)
    lat = src.get("latency_s") or {}
    _say(f"frames in {src['frames_in']}, published {src['frames_out']}, skipped {src['skipped']}, "
         f"dropped {sum(src['dropped'].values())}; received over MQTT: {len(received) if broker else 'n/a'}")
    plat = (src.get("previews") or {}).get("latency_s") or {}
    if plat:
        _say(f"preview latency per frame: p50 {plat['p50']:.3f} s, max {plat['max']:.3f} s "
             f"(prior as frames arrive; {src['previews']['out']} previews on demo/sample/preview/*)")
    if lat:
        _say(f"refined latency per frame: p50 {lat['p50']:.2f} s, max {lat['max']:.2f} s "
             "(window fill + CPU compute)")
    lag = summary["loop_lag"]["all"]
    if lag.get("n"):
        _say(f"event-loop lag while running: p50 {lag['p50_ms']:.2f} ms, max {lag['max_ms']:.1f} ms")
    for p in previews:
        _say(f"preview: {p}")
    _say(f"npz (upstream layout): {out_dir / 'sample' / 'clip.npz'}; log: {workdir / 'daemon.log'}")
    _say(f"done in {time.monotonic() - t_start:.0f} s")
    print(NOTICE)
    return 0


async def _start_subscriber(port: int, received: dict[int, Any]) -> tuple[asyncio.Task[None], asyncio.Event]:
    ready = asyncio.Event()

    async def consume() -> None:
        async for f in iter_frames("127.0.0.1", port, "demo", "sample", ready=ready):
            received[f.frame_index] = f
            assert f.depth is not None and f.depth_valid is not None  # the demo's frames carry depth
            v = f.depth[f.depth_valid]
            stats = (f"depth min {v.min():7.3f}  median {float(np.median(v)):7.3f}  "
                     f"max {v.max():7.3f}") if v.size else "depth: no valid pixel          "
            lat = f.latency_s
            print(f"  frame {f.frame_index:4d}  window {f.window_id:2d}  {stats}  "
                  f"valid {f.depth_valid.mean():5.1%}"
                  + (f"  mqtt latency {lat * 1e3:6.1f} ms" if lat is not None else ""), flush=True)

    return asyncio.create_task(consume()), ready


async def _run_daemon(cfg: Path, summary: Path, log_path: Path) -> int:
    """The daemon as a child process; its progress lines (startup, warm-up, ready) are echoed."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", "run", "--config", str(cfg), "--exit-when-done", "--summary",
        str(summary),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    echo = ("starting prior sidecar", "sidecar ready", "loading pipeline", "warming up", "warm-up done",
            "ready",
            "failed", "ERROR", "stopped")
    with open(log_path, "w") as log:
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            log.write(line + "\n")
            if any(k in line for k in echo) and "frame " not in line:
                print(f"  daemon | {line.split(': ', 1)[-1][:150]}", flush=True)
    return await proc.wait()


def _frames_from_npz(path: Path) -> dict[int, Any]:
    class _F:
        def __init__(self, depth: Any, valid: Any, idx: int, win: int) -> None:
            self.depth, self.depth_valid, self.frame_index, self.window_id = depth, valid, idx, win

    data = np.load(path)
    out = {}
    for k, idx in enumerate(data["frame_index"]):
        f = _F(data["depth"][k], data["mask"][k], int(idx), int(data["window_id"][k]))
        out[int(idx)] = f
        v = f.depth[f.depth_valid]
        print(f"  frame {int(idx):4d}  depth median {float(np.median(v)) if v.size else float('nan'):7.3f}")
    return out


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_cmd_demo(argparse.ArgumentParser().parse_args([])))
