"""The GPU actor of `geometryd cluster`: full geometry daemons (daemon.supervisor.Daemon) for its sources.

Ray gives the actor its GPU (``CUDA_VISIBLE_DEVICES``); each *run* is one ``Daemon`` with its own MoGe
sidecar, shared-memory rings and geometry worker process, serving the sources the controller handed over
in one call. Ingest happens here, next to the GPU: raw frames never cross the network. A later call (sources
moved here from a dead actor) starts a second run beside the first, so the running sources keep their
window state.

A run's daemon runs on its own event loop in a thread of the actor. The loop ignores
``add_signal_handler``: signals belong to the Ray worker process (Ray stops actors itself), and only the
main thread could install handlers anyway. The daemon's main process never imports Jittor (its geometry
worker process does, on that process's main thread, see daemon/stages/geometry.py), so no Jittor signal
handler reaches the Ray worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVarTuple, Unpack

import msgspec

from daemon.config import parse_config
from daemon.logging_setup import setup_logging
from daemon.supervisor import Daemon

log = logging.getLogger(__name__)

_Ts = TypeVarTuple("_Ts")


class _NoSignalLoop(asyncio.SelectorEventLoop):
    """An event loop for a daemon in a worker thread: signal handlers are the process owner's business."""

    def add_signal_handler(self, sig: int, callback: Callable[[Unpack[_Ts]], object],
                           *args: *_Ts) -> None:  # noqa: ARG002
        return None


class _Run:
    def __init__(self, run_id: str, daemon: Any) -> None:
        self.run_id = run_id
        self.daemon = daemon
        self.loop: asyncio.AbstractEventLoop | None = None
        self.rc: int | None = None
        self.error: str | None = None
        self.started = time.time()
        self.thread = threading.Thread(target=self._main, name=f"daemon-{run_id}", daemon=True)

    def _main(self) -> None:
        try:
            with asyncio.Runner(loop_factory=_NoSignalLoop) as runner:
                self.loop = runner.get_loop()
                self.rc = runner.run(self.daemon.run())
        except BaseException as exc:  # noqa: BLE001 - reported through status()
            self.error, self.rc = f"{type(exc).__name__}: {exc}", 1

    def stop(self) -> None:
        if self.loop is not None and self.rc is None:
            self.loop.call_soon_threadsafe(self.daemon.request_stop, "controller")


def run_config(cfg_toml: str, sources: list[str], client_id: str) -> Any:
    """The daemon config of one run: the cluster's config restricted to ``sources``, without HTTP (the
    controller serves /healthz and /metrics) and with an MQTT client id of its own (the default one
    contains the pid, which all runs of one actor share)."""
    cfg = parse_config(tomllib.loads(cfg_toml), base_dir=Path("/"))
    replace = msgspec.structs.replace
    missing = [s for s in sources if s not in cfg.sources]
    if missing:
        raise ValueError(f"unknown sources: {missing}")
    return replace(cfg, sources={s: cfg.sources[s] for s in sources}, http=replace(cfg.http, enabled=False),
                   mqtt=replace(cfg.mqtt, client_id=client_id[:128]))


class GpuActor:
    """Wrapped with ``ray.remote`` by the controller (threaded: status calls while daemons run)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.runs: dict[str, _Run] = {}
        self.incarnation = f"{os.getpid()}-{time.time():.3f}"
        setup_logging("info", "text")

    def info(self) -> dict[str, Any]:
        import ray

        return {"actor": self.name, "pid": os.getpid(), "incarnation": self.incarnation,
                "node": ray.get_runtime_context().get_node_id(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def start_sources(self, run_id: str, cfg_toml: str, sources: list[str]) -> dict[str, Any]:
        cfg = run_config(cfg_toml, sources, f"geometryd-{self.name}-{run_id}")
        run = _Run(run_id, Daemon(cfg))
        self.runs[run_id] = run
        run.thread.start()
        log.info("run started", extra={"actor": self.name, "run": run_id, "sources": ",".join(sources)})
        return self.info()

    def status(self) -> dict[str, Any]:
        runs = {}
        for run_id, r in self.runs.items():
            d = r.daemon
            sources = {}
            for name, runner in list(d.runners.items()):
                c = d.metrics.source(name)
                sources[name] = {"state": runner.state, "frames_in": c.frames_in, "frames_out": c.frames_out,
                                 "skipped": c.skipped, "dropped": dict(c.dropped), "error": runner.error}
            runs[run_id] = {"state": d.state if r.rc is None else "exited", "rc": r.rc, "error": r.error,
                            "warmup_s": getattr(d, "warmup_s", None), "sources": sources,
                            "started": r.started}
        return {**self.info(), "runs": runs}

    def stop(self, timeout_s: float = 60.0) -> dict[str, Any]:
        for r in self.runs.values():
            r.stop()
        end = time.monotonic() + timeout_s
        for r in self.runs.values():
            r.thread.join(max(0.0, end - time.monotonic()))
        return self.status()
