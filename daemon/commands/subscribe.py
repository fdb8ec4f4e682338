"""`geometryd subscribe`: the reference MQTT subscriber; one line per received frame, optional npz files."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from daemon.wire.subscribe import iter_frames, save_frame


def _format_line(s: dict[str, Any]) -> str:
    parts = [f"{s['source']} frame={s['frame_index']} window={s['window_id']} pts={s['pts']:.3f}"]
    if "depth_shape" in s:
        parts.append(f"depth={s['depth_shape'][0]}x{s['depth_shape'][1]}({s['depth_encoding']})"
                     f" valid={s['valid_fraction']:.1%}")
        if "depth_min" in s:
            parts.append(f"min={s['depth_min']:.4g} median={s['depth_median']:.4g} max={s['depth_max']:.4g}")
    if "points_shape" in s:
        parts.append(f"points={s['points_shape'][0]}x{s['points_shape'][1]}/{s['points_stride']}")
    for key in ("latency_ms", "pts_latency_ms"):
        if key in s:
            parts.append(f"{key}={s[key]}")
    return " ".join(parts)


async def _subscribe(args: argparse.Namespace) -> int:
    count = 0
    out_dir = Path(args.out) if args.out else None
    frames = iter_frames(args.host, args.port, args.prefix, args.source, qos=args.qos,
                         username=args.username or None, password=args.password or None)
    try:
        while args.count <= 0 or count < args.count:
            try:
                frame = await asyncio.wait_for(anext(frames), args.timeout if args.timeout > 0 else None)
            except StopAsyncIteration:
                break
            except TimeoutError:
                print(f"no frame within {args.timeout}s (got {count})", flush=True)
                return 1
            summary = frame.summary()
            if out_dir is not None:
                summary["file"] = str(save_frame(frame, out_dir))
            print(json.dumps(summary) if args.json else _format_line(summary), flush=True)
            count += 1
    finally:
        await frames.aclose()
    return 0


def _main(args: argparse.Namespace) -> int:
    import aiomqtt

    try:
        return asyncio.run(_subscribe(args))
    except aiomqtt.MqttError as exc:
        print(f"geometryd subscribe: MQTT error with {args.host}:{args.port}: {exc}", flush=True)
        return 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "subscribe",
        help="reference MQTT subscriber: decode depth/points messages, print one line per frame",
        description="Subscribe to <prefix>/<source>/{depth,points}, decode each frame (docs/mqtt.md) and "
        "print one line per frame: frame index, shape, depth stats, latency.",
    )
    p.add_argument("--host", default="127.0.0.1", help="broker host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=1883, help="broker port (default 1883)")
    p.add_argument("--prefix", default="geometry", help="topic prefix (default geometry)")
    p.add_argument("--source", default="+", help="source name, + for all (default +)")
    p.add_argument("--count", type=int, default=0, help="exit after N frames (default 0 = run forever)")
    p.add_argument("--timeout", type=float, default=0.0,
                   help="exit 1 when no frame arrives for this many seconds (default 0 = wait forever)")
    p.add_argument("--out", default="", help="also save each frame as <source>_<frame>.npz in this folder")
    p.add_argument("--json", action="store_true", help="print one JSON object per frame")
    p.add_argument("--qos", type=int, choices=(0, 1, 2), default=1, help="subscription QoS (default 1)")
    p.add_argument("--username", default="", help="broker user name")
    p.add_argument("--password", default="", help="broker password")
    p.set_defaults(func=_main)
