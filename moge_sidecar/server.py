"""The MoGe sidecar process: loads MoGe once, answers JSON-lines requests on a unix socket.

Protocol (one JSON object per line, UTF-8; frames never cross the socket, only ring names and slot numbers):

    sidecar -> client, on connect   {"op":"ready","pid":..,"device":..,"moge_version":..,"chunk":..}
    {"op":"ping","id":X}         -> {"op":"pong","id":X,"busy_s":..,"done":..}   (answered while computing)
    {"op":"prior","id":X,"ring":name,"slots":[..],"generations":[..]}
                                 -> {"op":"done","id":X,"timing":{...}}
                                 or {"op":"error","id":X,"error":"...",
                                     "kind":"bad_request|unknown_ring|stale_slot|internal"}
    {"op":"detach","id":X,"ring":name} -> {"op":"detached","id":X}

Priors follow the pinned MoGe order of operations (moge_sidecar/infer.py, spec 4.2) and are written into the
ring's prior slots; `ring.mark_prior` records which generation each prior slot holds.
The process exits within ~0.5 s of its parent (--parent-pid) dying; it polls instead of PR_SET_PDEATHSIG
because that signal fires when the parent *thread* that spawned it exits (wrong for a threaded daemon).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from daemon.logging_setup import setup_logging
from daemon.shm import FrameRing, ShmError, SlotRef, StaleSlotError, pid_alive
from moge_sidecar.infer import frames_to_image, load_moge

log = logging.getLogger("moge_sidecar")

MAX_LINE = 64 * 1024
ERROR_KINDS = ("bad_request", "unknown_ring", "stale_slot", "internal")  # the protocol's error "kind" values


class RequestError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class _Conn:
    sock: socket.socket
    lock: threading.Lock

    def send(self, obj: dict[str, Any]) -> None:
        data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        with self.lock:
            try:
                self.sock.sendall(data)
            except OSError:
                pass  # client went away; its requests are retried by the daemon


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moge_sidecar", description="MoGe prior sidecar of geometryd.")
    p.add_argument("--socket", required=True, type=Path, help="unix socket path to listen on")
    p.add_argument("--checkpoint", required=True, type=Path, help="MoGe model.pt")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--fp16", action="store_true", help="fp16 autocast forward (CUDA only; ignored on CPU)")
    p.add_argument("--resolution-level", type=int, default=9, choices=range(10), metavar="0..9")
    p.add_argument("--moge-version", type=int, default=1, choices=(1, 2))
    p.add_argument("--chunk", type=int, default=8, help="frames per forward pass")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process dies")
    p.add_argument("--warmup", type=int, default=1, choices=(0, 1),
                   help="run one dummy inference before announcing ready (first-call overheads)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--log-format", default="", choices=("", "text", "json"),
                   help="the daemon's logging.format (default: a plain line with the pid)")
    return p


def _watch_parent(parent_pid: int) -> None:
    direct_child = os.getppid() == parent_pid
    while True:
        if (direct_child and os.getppid() != parent_pid) or not pid_alive(parent_pid):
            log.warning("parent %d is gone; exiting", parent_pid)
            os._exit(3)
        time.sleep(0.2)


class Server:
    """Socket front end (one reader thread per connection) + one worker thread that owns the model."""

    def __init__(self, prior: Any, chunk: int, device_name: str, moge_version: int) -> None:
        self.prior = prior
        self.chunk = max(1, chunk)
        self.device_name = device_name
        self.moge_version = moge_version
        self.rings: dict[str, tuple[Any, int]] = {}
        self.jobs: queue.Queue[tuple[_Conn, dict[str, Any], float]] = queue.Queue()
        self.busy_since: float | None = None
        self.done = 0

    # -------------------------------------------------------------- connections
    def serve(self, listener: socket.socket) -> None:
        threading.Thread(target=self._worker, name="moge-worker", daemon=True).start()
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            conn = _Conn(sock, threading.Lock())
            conn.send({"op": "ready", "pid": os.getpid(), "device": self.device_name,
                       "moge_version": self.moge_version, "chunk": self.chunk})
            threading.Thread(target=self._reader, args=(conn,), name="moge-conn", daemon=True).start()

    def _reader(self, conn: _Conn) -> None:
        f = conn.sock.makefile("rb")
        try:
            while True:
                line = f.readline(MAX_LINE + 1)
                if not line:
                    return
                if len(line) > MAX_LINE:
                    conn.send({"op": "error", "id": None, "kind": "bad_request",
                               "error": f"request line longer than {MAX_LINE} bytes"})
                    return
                self._dispatch(conn, line)
        except OSError:
            return
        finally:
            f.close()
            conn.sock.close()

    def _dispatch(self, conn: _Conn, line: bytes) -> None:
        try:
            req = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            conn.send({"op": "error", "id": None, "kind": "bad_request", "error": f"invalid JSON: {exc}"})
            return
        if not isinstance(req, dict):
            conn.send({"op": "error", "id": None, "kind": "bad_request",
                       "error": "request must be a JSON object"})
            return
        op, rid = req.get("op"), req.get("id")
        if op == "ping":
            busy = self.busy_since
            conn.send({"op": "pong", "id": rid, "busy_s": 0.0 if busy is None else time.monotonic() - busy,
                       "done": self.done, "queued": self.jobs.qsize()})
        elif op in ("prior", "detach"):
            self.jobs.put((conn, req, time.monotonic()))
        else:
            conn.send({"op": "error", "id": rid, "kind": "bad_request", "error": f"unknown op {op!r}"})

    # -------------------------------------------------------------- model thread
    def _worker(self) -> None:
        while True:
            conn, req, queued_at = self.jobs.get()
            rid = req.get("id")
            self.busy_since = time.monotonic()
            try:
                if req["op"] == "detach":
                    self._detach(str(req.get("ring")))
                    conn.send({"op": "detached", "id": rid})
                else:
                    timing = self._prior(req)
                    timing["wait_ms"] = (self.busy_since - queued_at) * 1e3
                    conn.send({"op": "done", "id": rid, "timing": timing})
            except RequestError as exc:
                conn.send({"op": "error", "id": rid, "kind": exc.kind, "error": str(exc)})
            except Exception as exc:  # keep serving; the daemon decides what to do
                log.exception("prior request %r failed", rid)
                conn.send({"op": "error", "id": rid, "kind": "internal",
                           "error": f"{type(exc).__name__}: {exc}"})
            finally:
                self.busy_since = None
                self.done += 1

    def _ring(self, name: Any) -> Any:
        if not isinstance(name, str) or not name.startswith("geometryd-") or "/" in name:
            raise RequestError("bad_request", f"ring must be a 'geometryd-<pid>-<source>' name, got {name!r}")
        try:
            ino = os.stat(f"/dev/shm/{name}").st_ino
        except FileNotFoundError:
            self._detach(name)
            raise RequestError("unknown_ring", f"no shared-memory segment named {name!r}") from None
        cached = self.rings.get(name)
        if cached is not None and cached[1] == ino:
            return cached[0]
        self._detach(name)  # a new segment under an old name: remap
        try:
            ring = FrameRing.attach(name, timeout=1.0)
        except (FileNotFoundError, ShmError) as exc:
            raise RequestError("unknown_ring", f"cannot attach ring {name!r}: {exc}") from None
        self.rings[name] = (ring, ino)
        log.info("attached ring %s (%d slots, %dx%d)", name, ring.n_slots, ring.height, ring.width)
        return ring

    def _detach(self, name: str) -> None:
        cached = self.rings.pop(name, None)
        if cached is not None:
            cached[0].close()

    def _prior(self, req: dict[str, Any]) -> dict[str, Any]:
        slots, gens = req.get("slots"), req.get("generations")
        if (not isinstance(slots, list) or not isinstance(gens, list) or len(slots) != len(gens) or not slots
                or not all(type(v) is int for v in slots + gens)):
            raise RequestError("bad_request",
                               "'slots' and 'generations' must be non-empty int lists of equal length")
        ring = self._ring(req.get("ring"))
        bad = [s for s in slots if not 0 <= s < ring.n_slots]
        if bad:
            raise RequestError("bad_request",
                               f"slots {bad} out of range 0..{ring.n_slots - 1} of {ring.name}")
        refs = [SlotRef(s, g, -1) for s, g in zip(slots, gens)]
        t_read = t_infer = t_write = 0.0
        t_start = time.perf_counter()
        try:
            for ref in refs:
                ring.verify(ref)
            for i in range(0, len(refs), self.chunk):
                part = refs[i:i + self.chunk]
                t0 = time.perf_counter()
                # Zero-copy views of the slots; the only copy is the batch (CPU: one numpy memcpy per frame,
                # torch's threaded copy is ~40x slower on busy cores; CUDA: the upload straight from shm).
                if self.prior.device.type == "cpu":
                    batch = torch.from_numpy(np.stack([ring.frame(ref) for ref in part]))
                else:
                    dev = self.prior.device
                    batch = torch.stack([torch.from_numpy(ring.frame(ref)).to(dev) for ref in part])
                for ref in part:  # seqlock: nothing was rewritten while we copied
                    ring.verify(ref)
                t1 = time.perf_counter()
                points, mask = self.prior(frames_to_image(batch))
                points, mask = points.cpu().numpy(), mask.cpu().numpy()
                t2 = time.perf_counter()
                for j, ref in enumerate(part):
                    ring.prior_points(ref)[...] = points[j]
                    ring.prior_mask(ref)[...] = mask[j]
                    ring.mark_prior(ref)
                t3 = time.perf_counter()
                t_read += t1 - t0
                t_infer += t2 - t1
                t_write += t3 - t2
        except StaleSlotError as exc:
            raise RequestError("stale_slot", str(exc)) from None
        return {"frames": len(refs), "read_ms": t_read * 1e3, "infer_ms": t_infer * 1e3,
                "write_ms": t_write * 1e3, "total_ms": (time.perf_counter() - t_start) * 1e3}


def _set_process_title(title: str) -> None:
    try:
        import setproctitle
    except ImportError:  # e.g. a separate prior.python venv without it: keep the interpreter's name
        return
    setproctitle.setproctitle(title)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _set_process_title("geometryd: sidecar")
    if args.log_format:
        setup_logging(args.log_level, args.log_format)
    else:
        logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s moge_sidecar[%(process)d] %(levelname)s %(message)s")
    if args.parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(args.parent_pid,), name="parent-watch",
                         daemon=True).start()
    def _on_term(signum: int, _frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _on_term)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    prior = load_moge(args.checkpoint, args.device, args.fp16, args.resolution_level, args.moge_version)
    log.info("MoGe loaded in %.2f s on %s", time.perf_counter() - t0, prior.device)
    if args.warmup:
        t0 = time.perf_counter()
        prior(torch.full((1, 3, 64, 64), 0.5))
        log.info("warm-up inference %.2f s", time.perf_counter() - t0)

    path = str(args.socket)
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    server = Server(prior, args.chunk, str(prior.device), args.moge_version)
    try:
        server.serve(listener)
    finally:
        listener.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return 0
