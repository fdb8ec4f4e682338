"""Shared-memory handoff alone: daemon-side writer -> sidecar-like reader process, at 576x1024 by default.

The writer (this process) copies a frame into a FrameRing slot and sends `slot generation` over a unix socket
(as the prior protocol does); the reader process attaches to the ring, copies the slot's zero-copy view into
a batch buffer with one numpy memcpy (the sidecar's CPU path before a forward pass), verifies the seqlock and
acknowledges. Two runs:
- throughput: up to n_slots - 1 frames in flight, as fast as possible (frames/s);
- latency: one frame at a time at `--fps` (write start -> reader's ack received; median / p99 ms).
Baseline for context: the same frames sent as bytes through the socket instead of shared memory.

    python bench/bench_shm.py [--height 576 --width 1024 --frames 300 --fps 30]
Writes bench/results/shm.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from daemon.shm import FrameRing  # noqa: E402

READER = """
    import socket, sys, numpy as np, torch
    from daemon.shm import FrameRing, SlotRef
    mode, name, path = sys.argv[1], sys.argv[2], sys.argv[3]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(path)
    f = s.makefile('rb')
    if mode == 'shm':
        ring = FrameRing.attach(name)
        batch = np.empty((ring.height, ring.width, 3), np.uint8)
        for line in f:
            slot, gen = map(int, line.split())
            ref = SlotRef(slot, gen, -1)
            np.copyto(batch, ring.frame(ref))  # the sidecar's batch copy (CPU path)
            tensor = torch.from_numpy(batch)
            ring.verify(ref)
            s.sendall(b'ok\\n')
    else:
        h, w = int(sys.argv[4]), int(sys.argv[5])
        n = h * w * 3
        buf = bytearray(n)
        view = memoryview(buf)
        while True:
            got = 0
            while got < n:
                k = s.recv_into(view[got:], n - got)
                if k == 0:
                    sys.exit(0)
                got += k
            batch = torch.from_numpy(np.frombuffer(buf, np.uint8).reshape(h, w, 3).copy())
            s.sendall(b'ok\\n')
"""


def machine_info() -> dict[str, object]:
    import torch

    return {"cpu_count": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "numpy": np.__version__, "torch": torch.__version__,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_avg": os.getloadavg()}


def _reader(mode: str, name: str, sock_path: str, h: int, w: int) -> tuple[subprocess.Popen, socket.socket]:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(1)
    cmd = [sys.executable, "-c", textwrap.dedent(READER), mode, name, sock_path, str(h), str(w)]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    conn, _ = srv.accept()
    srv.close()
    return proc, conn


def run_shm(frames: list[np.ndarray], n_slots: int, fps: float, tmp: Path) -> dict[str, object]:
    h, w, _ = frames[0].shape
    ring = FrameRing.create("benchshm", n_slots, h, w)
    proc, conn = _reader("shm", ring.name, str(tmp / "shm.sock"), h, w)
    acks = conn.makefile("rb")
    try:
        # throughput: keep up to n_slots - 1 frames in flight
        inflight: list = []
        t0 = time.perf_counter()
        for i, fr in enumerate(frames):
            if len(inflight) >= n_slots - 1:
                acks.readline()
                ring.release(inflight.pop(0))
            ref = ring.write_frame(fr, i, 0.0)
            conn.sendall(f"{ref.slot} {ref.generation}\n".encode())
            inflight.append(ref)
        for ref in inflight:
            acks.readline()
            ring.release(ref)
        throughput = len(frames) / (time.perf_counter() - t0)
        # latency: one frame at a time at the camera rate
        lat = []
        period = 1.0 / fps
        next_t = time.perf_counter()
        for i, fr in enumerate(frames[: max(30, len(frames) // 2)]):
            next_t += period
            t1 = time.perf_counter()
            ref = ring.write_frame(fr, i, 0.0)
            conn.sendall(f"{ref.slot} {ref.generation}\n".encode())
            acks.readline()
            lat.append((time.perf_counter() - t1) * 1e3)
            ring.release(ref)
            time.sleep(max(0.0, next_t - time.perf_counter()))
    finally:
        conn.shutdown(socket.SHUT_RDWR)
        acks.close()
        conn.close()
        proc.wait(timeout=30)
        ring.close()
        ring.unlink()
    return {"frames_per_s": throughput, "latency_ms_median": float(np.median(lat)),
            "latency_ms_p99": float(np.percentile(lat, 99)), "latency_samples": len(lat)}


def run_socket_bytes(frames: list[np.ndarray], fps: float, tmp: Path) -> dict[str, object]:
    h, w, _ = frames[0].shape
    proc, conn = _reader("bytes", "-", str(tmp / "bytes.sock"), h, w)
    acks = conn.makefile("rb")
    try:
        t0 = time.perf_counter()
        for fr in frames:
            conn.sendall(fr.data)
            acks.readline()
        rate = len(frames) / (time.perf_counter() - t0)
        lat = []
        next_t = time.perf_counter()
        for fr in frames[:30]:  # paced like the shm latency run
            next_t += 1.0 / fps
            t1 = time.perf_counter()
            conn.sendall(fr.data)
            acks.readline()
            lat.append((time.perf_counter() - t1) * 1e3)
            time.sleep(max(0.0, next_t - time.perf_counter()))
    finally:
        conn.shutdown(socket.SHUT_RDWR)
        acks.close()
        conn.close()
        proc.wait(timeout=30)
    return {"frames_per_s": rate, "latency_ms_median": float(np.median(lat))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--height", type=int, default=576)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "shm.json")
    args = ap.parse_args(argv)
    import tempfile

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8) for _ in range(16)]
    frames = [frames[i % 16] for i in range(args.frames)]
    with tempfile.TemporaryDirectory(prefix="bench-shm-") as tmp:
        shm = run_shm(frames, args.slots, args.fps, Path(tmp))
        sock = run_socket_bytes(frames[: max(50, args.frames // 3)], args.fps, Path(tmp))
    result = {"name": "shm", "height": args.height, "width": args.width, "frames": args.frames,
              "slots": args.slots, "frame_mib": args.height * args.width * 3 / 2 ** 20,
              "shm": shm, "socket_bytes_baseline": sock, "machine": machine_info()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
