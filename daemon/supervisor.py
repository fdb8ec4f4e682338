"""`geometryd run`: the streaming daemon's composition root and lifecycle (uvicorn-style).

Order (architecture.md, style.md "asyncio lifecycle"): capture signals -> config + logging -> HTTP server
(/healthz says "starting") -> stale shm cleanup -> prior sidecar -> Jittor pipeline load + warm-up window (kernels
compile before READY) -> publishers -> one ring + task group per source -> ``READY=1`` -> main loop with a
periodic tick (``WATCHDOG=1`` while the loop is healthy, loop lag, gauges) -> on SIGTERM/SIGINT or when every
file source is done (``--exit-when-done``): ``STOPPING=1``, stop ingest, finish and flush windows within
``daemon.shutdown_grace_s``, flush publishers, stop the sidecar, unlink shared memory, exit 0. Every setup
step registers its teardown on one ``AsyncExitStack`` so teardown runs in reverse order on every path.

Per source (see :class:`SourceRunner`): ingest -> FrameRing (shm) -> WindowBuilder + Admission (overload
policy) -> prior task (sidecar fills prior slots of window N+1 while geometry runs window N) -> geometry task
(one worker PROCESS shared by all sources: Jittor holds the GIL while it computes, see
daemon/stages/geometry.py) -> publishers. Queues carry only windows of slot refs. Every
ingested frame ends as exactly one of: published (frames_out), skipped, dropped{reason}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from daemon import sdnotify
from daemon.metrics import Metrics
from daemon.progress import STALLED, ProgressMonitor
from daemon.stages.preview import PreviewScale, make_preview
from daemon.stages.window import Admission, FrameMeta, Verdict, Window, WindowBuilder, ring_slots

log = logging.getLogger(__name__)

_END = None  # queue sentinel: no more windows


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run the streaming daemon (sources -> depth/point maps -> MQTT)",
                              description="Run the streaming daemon with the sources of a config file.")
    p.add_argument("--config", default="config.toml", help="config file (default: ./config.toml)")
    p.add_argument("--exit-when-done", action="store_true",
                   help="exit 0 once every file source has ended (and was flushed); 1 if one failed")
    p.add_argument("--summary", metavar="JSON", help="write per-source counters and loop-lag stats here at exit")
    # PLUMBING ONLY (bench/e2e_cpu.py): replace the pipeline by the identity processor with this
    # per-window delay. Hidden: it produces no geometry.
    p.add_argument("--plumbing-identity-delay", type=float, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from daemon.config import load_config_or_exit
    from daemon.logging_setup import setup_logging

    cfg = load_config_or_exit(args.config, runnable=True)
    if args.summary and (problem := _unwritable(Path(args.summary))):
        print(f"geometryd run: error: --summary {args.summary}: {problem}", file=sys.stderr)
        return 2
    setup_logging(cfg.logging.level, cfg.logging.format)
    daemon = Daemon(cfg, exit_when_done=args.exit_when_done, identity_delay=args.plumbing_identity_delay,
                    summary_path=args.summary)
    return asyncio.run(daemon.run())


def _unwritable(path: Path) -> str | None:
    """Why a file cannot be written at ``path`` (checked before startup, not after the run), or None."""
    folder = path.parent
    if not folder.is_dir():
        return f"the folder {folder} does not exist"
    if path.is_dir():
        return "is a folder"
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return "permission denied"
    return None


class SourceFailed(Exception):
    """A stage gave up on one source (the source's state becomes ``failed``; the daemon keeps running)."""


class _StoppedDuringStartup(Exception):
    pass


class _SourceFailed(Exception):
    """A source's task group ends for a reason already logged (no traceback)."""


@dataclasses.dataclass
class LagStats:
    samples: list[float] = dataclasses.field(default_factory=list)
    busy_samples: list[float] = dataclasses.field(default_factory=list)  # while the geometry worker runs

    def summary(self) -> dict[str, Any]:
        def stats(xs: list[float]) -> dict[str, float]:
            if not xs:
                return {"n": 0}
            s = sorted(xs)
            return {"n": len(s), "p50_ms": 1e3 * statistics.median(s),
                    "p99_ms": 1e3 * s[min(len(s) - 1, int(0.99 * len(s)))], "max_ms": 1e3 * s[-1]}

        return {"all": stats(self.samples), "geometry_busy": stats(self.busy_samples)}


class Daemon:
    def __init__(self, cfg: Any, *, exit_when_done: bool = False, identity_delay: float | None = None,
                 summary_path: str | None = None) -> None:
        self.cfg = cfg
        self.exit_when_done = exit_when_done
        self.identity_delay = identity_delay
        self.summary_path = summary_path
        self.metrics = Metrics()
        self.state = "starting"
        self.stop_event = asyncio.Event()
        self.runners: dict[str, SourceRunner] = {}
        self.sidecar: Any = None
        self.mqtt: Any = None
        self.files: Any = None
        self.worker: Any = None
        self.lag = LagStats()
        self.aborted_startup = False
        self.failed = False
        self.webrtc: Any = None  # daemon.stages.ingest_webrtc.WebrtcSources (with the HTTP server)
        self.hub: Any = None  # daemon.viewer.hub.ResultsHub (with the HTTP server)
        self.warmup_s: float | None = None  # one warm-up window's seconds (capacity, daemon/cluster/)
        self.progress = ProgressMonitor(time.monotonic())  # the watchdog's view of the geometry stage
        self._reported_reasons: list[str] = []

    # ---- lifecycle -------------------------------------------------------------------------------------
    def fatal(self, why: str) -> None:
        """An unrecoverable fault: stop everything and exit 1 (systemd restarts the service)."""
        if self.failed:
            return  # one reason line; later faults are consequences
        log.error("fatal: %s", why)
        self.failed = True
        self.request_stop(why)

    def request_stop(self, why: str = "signal") -> None:
        if not self.stop_event.is_set():
            log.info("stop requested", extra={"reason": why})
            self.stop_event.set()

    def _on_signal(self, name: str) -> None:
        """First SIGTERM/SIGINT: graceful stop. A second one: kill the children and exit now (uvicorn)."""
        if not self.stop_event.is_set():
            self.request_stop(name)
            return
        log.error("second %s: forcing exit", name)
        if self.worker is not None:
            self.worker.shutdown()
        for r in self.runners.values():
            if r.ring is not None:
                with contextlib.suppress(Exception):
                    r.ring.unlink()
        logging.shutdown()
        os._exit(1)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig.name)
        rc = 0
        tick = asyncio.create_task(self._tick(), name="tick")
        try:
            async with contextlib.AsyncExitStack() as stack:
                await self._until_stopped(self._startup(stack))
                rc = await self._serve()
                await self._final_status()
            # after the exit stack: the publishers have resolved (delivered or dropped) every frame
            lost = self._sources_with_nothing_delivered()
            if lost and rc == 0:
                log.error("every frame was dropped: nothing reached any sink",
                          extra={"sources": ",".join(lost)})
                rc = 1
        except _StoppedDuringStartup:
            log.info("stopped during startup")
            self.aborted_startup = True
        except Exception as exc:
            log.error("daemon failed: %s: %s", type(exc).__name__, exc, exc_info=True)
            rc = 1
        finally:
            tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tick
            if self.worker is not None:
                self.worker.shutdown()  # normally already stopped by the exit stack
            self._log_summary()
            self._write_summary()
            log.info("stopped", extra={"rc": rc})
        return rc

    async def _until_stopped(self, coro: Any) -> Any:
        """Run a startup step; a SIGTERM meanwhile abandons it (the exit stack then kills a worker process
        that is still loading or warming up)."""
        step = asyncio.ensure_future(coro)
        stop = asyncio.ensure_future(self.stop_event.wait())
        try:
            await asyncio.wait({step, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not step.done():
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await step
            raise _StoppedDuringStartup()
        return step.result()

    async def _startup(self, stack: contextlib.AsyncExitStack) -> None:
        cfg = self.cfg
        if cfg.http.enabled:
            from daemon.http import HttpServer
            from daemon.viewer.setup import build_web

            self.webrtc, self.hub, web_setup = build_web(cfg, self.metrics)  # WHIP ingest + live viewer
            stack.push_async_callback(self.webrtc.close)
            stack.push_async_callback(self.hub.close)
            from daemon.http_guard import ConnectionLimits

            h = cfg.http
            limits = ConnectionLimits(h.header_timeout_s, h.idle_timeout_s, h.max_connections)
            http = HttpServer(cfg.http.bind, cfg.http.port, self.metrics.render, self.health, cfg.http.token,
                              web_setup, limits)
            await stack.enter_async_context(http)
            log.info("http listening", extra={"bind": cfg.http.bind, "port": http.port})

        from daemon.shm import FrameRing, check_shm_room, cleanup_stale_segments, ring_bytes

        from daemon.stages.prior import cleanup_stale_prior_dirs

        removed = await asyncio.to_thread(cleanup_stale_segments)
        if removed:
            log.info("removed stale shared memory", extra={"segments": ",".join(removed)})
        removed = await asyncio.to_thread(cleanup_stale_prior_dirs)
        if removed:
            log.info("removed stale prior sidecar folders", extra={"folders": ",".join(removed)})
        g = cfg.geometry
        runners = [SourceRunner(self, name, src) for name, src in cfg.sources.items()]
        slots = {r.name: ring_slots(g.window_size, g.overlap, r.admission.bound, cfg.daemon.shm_slack_frames)
                 for r in runners}
        check_shm_room(sum(ring_bytes(n, g.height, g.width) for n in slots.values()))  # before any model load

        await self._start_sidecar(stack)
        await self._load_pipeline(stack)
        await self._start_publishers(stack)

        for runner in runners:
            name, src, n_slots = runner.name, runner.src, slots[runner.name]
            runner.ring = FrameRing.create(name, n_slots, g.height, g.width)
            stack.push_async_callback(self._close_ring, runner.ring)
            self.runners[name] = runner
            log.info("source ready", extra={"source": name, "type": src.type, "ring": runner.ring.name,
                                            "slots": n_slots})

    async def _start_sidecar(self, stack: contextlib.AsyncExitStack) -> None:
        from daemon.stages.prior import PriorSidecar

        ckpt = self.cfg.prior_checkpoint()
        lg = self.cfg.logging
        self.sidecar = PriorSidecar(self.cfg.prior, ckpt, log_level=lg.level,  # interpreter: prior.python or ours
                                    log_format=lg.format)
        log.info("starting prior sidecar", extra={"checkpoint": str(ckpt)})
        await self.sidecar.start()
        stack.push_async_callback(self._stop_sidecar)

    async def _stop_sidecar(self) -> None:
        with contextlib.suppress(Exception):
            await self.sidecar.stop()

    async def _load_pipeline(self, stack: contextlib.AsyncExitStack) -> None:
        from daemon.stages.geometry import GeometryWorker, ProcessorSpec, SessionParams, WorkerPolicy

        cfg = self.cfg
        params = SessionParams.from_config(cfg.geometry, cfg.streaming)
        if self.identity_delay is not None:
            log.warning("PLUMBING-ONLY identity geometry selected: outputs are the prior, not GeometryCrafter")
            spec = ProcessorSpec("identity", params, identity_delay_s=self.identity_delay,
                                 log_level=cfg.logging.level, log_format=cfg.logging.format)
        else:
            spec = ProcessorSpec("pipeline", params, cfg.model.dir, cfg.model.variant, cfg.model.dtype,
                                 cfg.geometry.low_memory, log_level=cfg.logging.level,
                                 log_format=cfg.logging.format)
        self.worker = GeometryWorker(spec, WorkerPolicy.from_config(cfg.geometry))
        self.worker.on_unavailable = self.fatal
        stack.push_async_callback(self.worker.stop)
        log.info("loading pipeline in the geometry worker process",
                 extra={"model_dir": cfg.model.dir, "variant": cfg.model.variant, "dtype": cfg.model.dtype,
                        "processor": spec.kind})
        secs = await self.worker.start()
        log.info("pipeline loaded; warming up (compiles kernels)",
                 extra={"seconds": round(secs, 2), "frames": params.window_size,
                        "size": f"{params.height}x{params.width}"})
        secs = await self.worker.warm_up()
        self.warmup_s = secs
        log.info("warm-up done", extra={"seconds": round(secs, 2),
                                        "window_deadline_s": round(self.worker.deadline_s, 2)})

    async def _start_publishers(self, stack: contextlib.AsyncExitStack) -> None:
        cfg = self.cfg
        names = list(cfg.sources)
        # Import what the serving tasks import lazily now: a first import inside a task blocks the event
        # loop for ~0.3 s (measured: aiomqtt in the publisher task, av in the ingest thread holding the GIL).
        import av  # noqa: F401
        if cfg.mqtt.enabled:
            import aiomqtt  # noqa: F401
        if cfg.mqtt.enabled:
            from daemon.stages.publish_mqtt import MqttPublisher

            self.mqtt = await stack.enter_async_context(MqttPublisher(cfg.mqtt, names, self.metrics))
        if cfg.files.enabled:
            from daemon.stages.publish_files import FileSink

            self.files = FileSink(cfg.files)
            stack.callback(self.files.close)

    async def _serve(self) -> int:
        tasks = {name: asyncio.create_task(r.run(), name=f"source-{name}") for name, r in self.runners.items()}
        self.state = "ready"
        self.progress.progress(time.monotonic())
        sdnotify.notify(f"READY=1\nSTATUS=serving {len(tasks)} source(s)\nMAINPID={os.getpid()}")
        log.info("ready", extra={"sources": len(tasks)})
        file_sources = [n for n, r in self.runners.items() if r.src.type == "file"]
        stop = asyncio.create_task(self.stop_event.wait())
        try:
            while not self.stop_event.is_set():
                if (self.exit_when_done and (file_sources or not tasks)
                        and all(tasks[n].done() for n in file_sources)):
                    self.request_stop("all file sources done")
                    break
                waiting = [stop] + [t for t in tasks.values() if not t.done()]
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        self.state = "stopping"
        sdnotify.notify("STOPPING=1\nSTATUS=stopping")
        for r in self.runners.values():
            r.stop_ingest()
        grace = self.cfg.daemon.shutdown_grace_s
        pending = [t for t in tasks.values() if not t.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace)
            for t in late:
                log.warning("shutdown grace exceeded; cancelling", extra={"task": t.get_name(), "grace_s": grace})
                t.cancel()
            if late:
                await asyncio.wait(late)
        failed = [n for n, r in self.runners.items() if r.state == "failed"]
        if self.failed or (self.exit_when_done and any(n in failed for n in file_sources)):
            return 1
        return 0

    def _sources_with_nothing_delivered(self) -> list[str]:
        """Sources that took frames in and delivered none, dropping them for a cause other than the stop
        itself (a run that reached nobody must not exit 0)."""
        out = []
        for name in self.runners:
            c = self.metrics.source(name)
            causes = {k for k, v in c.dropped.items() if v and k not in ("shutdown", "mqtt_shutdown")}
            if c.frames_in and not c.frames_out and causes:
                out.append(name)
        return out

    async def _final_status(self) -> None:
        if self.mqtt is not None:
            for name, r in self.runners.items():
                with contextlib.suppress(Exception):
                    await self.mqtt.publish_status(name, r.status_dict())

    def _log_summary(self) -> None:
        for name, r in self.runners.items():
            c = self.metrics.source(name)
            log.info("source summary", extra={"source": name, "state": r.state, "frames_in": c.frames_in,
                                              "frames_out": c.frames_out, "skipped": c.skipped,
                                              "dropped": c.dropped_total, "balanced": c.balanced()})

    # ---- periodic tick ---------------------------------------------------------------------------------
    async def _tick(self) -> None:
        interval = self.cfg.daemon.watchdog_interval_s
        systemd_interval = sdnotify.watchdog_interval_s()
        if systemd_interval:
            interval = min(interval, systemd_interval)
        period = min(interval, 0.1)  # lag is sampled at 10 Hz; the watchdog ping at its own interval
        last_ping = 0.0
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(period)
            lag = max(0.0, time.monotonic() - t0 - period)
            self.metrics.loop_lag.observe(lag)
            if self.state == "ready":  # the summary's stats: serving only (startup imports excluded)
                self.lag.samples.append(lag)
                if self.worker is not None and self.worker.busy_since is not None:
                    self.lag.busy_samples.append(lag)
            now = time.monotonic()
            self._update_gauges()
            reasons = self.degraded_reasons(now)
            if reasons != self._reported_reasons:
                self._reported_reasons = reasons
                await self._on_health_change(reasons)
            if now - last_ping >= interval:
                last_ping = now
                if self.state == "starting":
                    # pipeline warm-up may take minutes: ask systemd for more start time, in steps
                    sdnotify.notify(f"EXTEND_TIMEOUT_USEC={int(3 * interval * 1e6)}")
                elif self.state == "ready" and lag < interval and STALLED not in reasons:
                    sdnotify.notify("WATCHDOG=1")
                elif self.state == "stopping":
                    sdnotify.notify(f"EXTEND_TIMEOUT_USEC={int(3 * interval * 1e6)}")

    def _update_gauges(self) -> None:
        m = self.metrics
        if self.sidecar is not None:
            m.sidecar_restarts.set(getattr(self.sidecar, "restarts", 0))
        if self.worker is not None:
            m.geometry_restarts.set(self.worker.restarts)
        if self.mqtt is not None:
            m.mqtt_reconnects.set(getattr(self.mqtt, "reconnects", 0))
            m.mqtt_published.set(getattr(self.mqtt, "published", 0))
            dropped = getattr(self.mqtt, "dropped", 0)
            m.mqtt_dropped.set(sum(dropped.values()) if isinstance(dropped, dict) else dropped)
        jt = sys.modules.get("jittor")
        m.update_device_memory(jt)

    # ---- progress / health / summary -------------------------------------------------------------------
    def degraded_reasons(self, now: float | None = None) -> list[str]:
        """Every reason the daemon is not fully serving: the pipeline's progress (daemon/progress.py; bare
        codes) and the services' state (``"<code>: <detail>"``). Empty: healthy."""
        if self.state != "ready":
            return []
        return self.progress_reasons(now) + self.service_reasons(self._sidecar_up(),
                                                                  self.worker is not None and self.worker.alive)

    def progress_reasons(self, now: float | None = None) -> list[str]:
        """Why the pipeline is not making progress (empty: it is), see daemon/progress.py."""
        now = time.monotonic() if now is None else now
        w = self.worker
        if self.state != "ready" or w is None:
            return []
        pending = any(r.waiting > 0 or r.in_geometry for r in self.runners.values())
        return self.progress.reasons(now, pending=pending, restarting=w.restarting, deadline_s=w.deadline_s)

    async def _on_health_change(self, reasons: list[str]) -> None:
        if reasons:
            log.warning("degraded", extra={"reasons": ",".join(reasons)})
        else:
            log.info("healthy again")
        if self.mqtt is not None:
            for name, r in self.runners.items():
                with contextlib.suppress(Exception):
                    await self.mqtt.publish_status(name, r.status_dict())

    def health(self) -> dict[str, Any]:
        now = time.monotonic()
        sources = {}
        for name, r in self.runners.items():
            c = self.metrics.source(name)
            sources[name] = {
                "state": r.state,
                "last_frame_age_s": None if r.last_frame_t is None else round(now - r.last_frame_t, 3),
                "frames_in": c.frames_in, "frames_out": c.frames_out, "skipped": c.skipped,
                "dropped": dict(c.dropped), "error": r.error,
            }
        sidecar_up = self._sidecar_up()
        mqtt_connected = None if self.mqtt is None else self.mqtt.connected
        worker_up = self.worker is not None and self.worker.alive
        reasons = self.degraded_reasons(now)
        ok = self.state == "ready" and not reasons
        return {"ok": ok, "state": self.state, "degraded": reasons, "sources": sources,
                "sidecar_up": sidecar_up,
                "geometry_worker_up": worker_up,
                "status": "degraded" if reasons else ("ok" if ok else self.state), "reasons": reasons,
                "geometry_restarts": getattr(self.worker, "restarts", 0),
                "geometry_deadline_s": getattr(self.worker, "deadline_s", None),
                "mqtt_connected": mqtt_connected,
                "loop_lag_ms": round(1e3 * self.lag.samples[-1], 3) if self.lag.samples else None}

    def service_reasons(self, sidecar_up: bool, worker_up: bool) -> list[str]:
        """Why the daemon is not fully serving, one ``"<code>: <detail>"`` per cause (empty = healthy).
        Components append their own codes here (the list is additive)."""
        reasons: list[str] = []
        if not sidecar_up:
            reasons.append("prior_sidecar_down: the MoGe sidecar is not connected")
        if not worker_up:
            reasons.append("geometry_worker_down: the geometry worker process is not running")
        problem = getattr(self.mqtt, "problem", None)
        if problem is not None:
            kind, detail = problem
            reasons.append(f"mqtt_{kind}: {detail}")
        return reasons

    def _sidecar_up(self) -> bool:
        return self.sidecar is not None and self.sidecar.connected

    async def _close_ring(self, ring: Any) -> None:
        for user in (self.sidecar, self.worker):
            if user is not None and getattr(user, "alive", True):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(user.detach(ring.name), 5)
        _close_ring(ring)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sources": {}, "loop_lag": self.lag.summary()}
        for name, r in self.runners.items():
            c = self.metrics.source(name)
            out["sources"][name] = {"state": r.state, "error": r.error, "frames_in": c.frames_in,
                                    "frames_out": c.frames_out, "skipped": c.skipped,
                                    "dropped": dict(c.dropped), "balanced": c.balanced(),
                                    "windows": r.windows_done, "reconnects": r.reconnects,
                                    "latency_s": _quantiles(c.latencies),
                                    "previews": {"in": c.previews_in, "out": c.previews_out,
                                                 "dropped": dict(c.previews_dropped),
                                                 "balanced": c.previews_balanced(),
                                                 "latency_s": _quantiles(c.preview_latencies)},
                                    "window_fps": c.window_fps}
        out["sidecar_restarts"] = getattr(self.sidecar, "restarts", None)
        out["geometry"] = {"restarts": getattr(self.worker, "restarts", None),
                           "window_deadline_s": getattr(self.worker, "deadline_s", None),
                           "last_recovery_s": getattr(self.worker, "last_recovery_s", None)}
        if self.mqtt is not None:
            d = getattr(self.mqtt, "dropped", None)
            out["mqtt"] = {"published": getattr(self.mqtt, "published", None),
                           "dropped": dict(d) if isinstance(d, dict) else d,
                           "reconnects": getattr(self.mqtt, "reconnects", None)}
        return out

    def _write_summary(self) -> None:
        if not self.summary_path:
            return
        tmp = Path(self.summary_path).with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.summary(), indent=1, default=str))
            tmp.replace(self.summary_path)
        except OSError as exc:  # e.g. the folder vanished during the run: one line, no traceback
            log.error("cannot write the summary %s: %s", self.summary_path, exc.strerror or exc)


def _quantiles(xs: list[float]) -> dict[str, float] | None:
    if not xs:
        return None
    s = sorted(xs)
    return {"p50": statistics.median(s), "p90": s[int(0.9 * (len(s) - 1))],
            "p99": s[int(0.99 * (len(s) - 1))], "max": s[-1]}


def _close_ring(ring: Any) -> None:
    for op in (ring.close, ring.unlink):
        try:
            op()
        except (BufferError, FileNotFoundError) as exc:  # a view still alive in an abandoned thread
            log.warning("ring cleanup", extra={"ring": ring.name, "error": str(exc)})
            if op is ring.close:
                continue


class SourceRunner:
    """One source's task group: feeder (ingest -> ring -> windows), prior task, geometry+publish task."""

    def __init__(self, daemon: Daemon, name: str, src: Any) -> None:
        self.d, self.name, self.src = daemon, name, src
        cfg = daemon.cfg
        self.builder = WindowBuilder(cfg.geometry.window_size, cfg.geometry.overlap)
        self.admission = Admission(cfg.overload.policy, cfg.overload.max_queued_windows)
        self.ring: Any = None
        self.state = "starting"
        self.error: str | None = None
        self.last_frame_t: float | None = None
        self.windows_done = 0
        self.reconnects = 0
        self.ingest_cut = False  # the feeder was cancelled by a stop before its ingest ended
        self.inflight: dict[int, FrameMeta] = {}  # admitted, not yet published, by seq
        self.waiting = 0  # windows emitted but not yet started by geometry
        self.in_geometry = False  # a window of this source is in the geometry worker
        self._session_gen = 1  # worker generation that holds this source's StreamingSession
        self._space = asyncio.Condition()
        self._seq = 0
        self._frame_index = 0
        self._feeder: asyncio.Task[None] | None = None
        self.win_q: asyncio.Queue[Window | None] = asyncio.Queue()
        self.geo_q: asyncio.Queue[Window | None] = asyncio.Queue()
        # prior as frames arrive (small batches) and the preview tier (daemon/stages/preview.py)
        self.prior_q: asyncio.Queue[tuple[Any, FrameMeta, int] | None] = asyncio.Queue()
        self._prior_upto = 0  # frames (by seq) whose per-frame prior request is finished
        self._prior_cond = asyncio.Condition()
        self._batcher_done = False
        self.preview_on = bool(getattr(src, "preview", False)) and (cfg.mqtt.enabled or cfg.http.enabled)
        self.preview_scale = PreviewScale(cfg.streaming.cut_threshold)
        self._preview_pending: set[int] = set()  # seqs whose preview was not yet handed to a sink

    def _make_ingest(self) -> Any:
        g = self.d.cfg.geometry
        src = self.src
        if src.type == "file":
            from daemon.stages.ingest_file import FileIngest

            return FileIngest(self.name, src.path, g.height, g.width, loop=src.loop, realtime=src.realtime)
        if src.type == "rtsp":
            from daemon.stages.ingest_rtsp import RtspIngest

            m = self.d.metrics

            def on_reconnect() -> None:
                self.reconnects += 1
                m.source_reconnects.labels(self.name).inc()

            return RtspIngest(self.name, src.url, g.height, g.width, open_timeout_s=src.open_timeout_s,
                              stall_timeout_s=src.stall_timeout_s, reconnect_initial_s=src.reconnect_initial_s,
                              reconnect_max_s=src.reconnect_max_s, on_reconnect=on_reconnect,
                              on_up=lambda up: m.source_up.labels(self.name).set(1 if up else 0),
                              on_error=lambda kind: m.source_errors.labels(self.name, kind).inc())
        if src.type == "webrtc":  # sessions arrive through WHIP (daemon/whip.py)
            return self.d.webrtc.get(self.name)
        raise NotImplementedError(f"source {self.name}: type {src.type!r} is not served by this build")

    def stop_ingest(self) -> None:
        if self._feeder is not None and not self._feeder.done():
            self._feeder.cancel()

    def status_dict(self) -> dict[str, Any]:
        c = self.d.metrics.source(self.name)
        reasons = self.d.degraded_reasons()
        return {"state": self.state, "frames_in": c.frames_in, "frames_out": c.frames_out,
                "skipped": c.skipped, "dropped": c.dropped_total,
                "health": "degraded" if reasons else "ok", "reasons": reasons}

    async def run(self) -> None:
        self._feeder = asyncio.create_task(self._feed(), name=f"feed-{self.name}")
        tasks = [self._feeder,
                 asyncio.create_task(self._prior_batches(), name=f"prior-frames-{self.name}"),
                 asyncio.create_task(self._prior_loop(), name=f"prior-{self.name}"),
                 asyncio.create_task(self._geometry_loop(), name=f"geometry-{self.name}")]
        try:
            await asyncio.gather(*tasks)
            if self.state != "failed":
                # cut off by a stop (SIGTERM): a live source never "ends", a file source did not reach its end
                self.state = "stopped" if self.ingest_cut else "done"
        except _SourceFailed as exc:  # already logged as the daemon's fatal reason
            self.state, self.error = "failed", str(exc)
        except Exception as exc:
            self.state, self.error = "failed", str(exc)
            log.exception("source failed", extra={"source": self.name})
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.state == "running":
                self.state = "stopped"  # cut off by the shutdown grace
            # admitted frames without a result: cut off by shutdown (grace exceeded) or by a failure
            self._account_lost("shutdown" if self.d.stop_event.is_set() else "lost")
            self.d.metrics.preview_drop(self.name, "shutdown", len(self._preview_pending))
            self._preview_pending.clear()

    def _account_lost(self, reason: str) -> None:
        if self.inflight:
            self.d.metrics.drop(self.name, reason, len(self.inflight))
            self.inflight.clear()

    # ---- feeder ----------------------------------------------------------------------------------------
    async def _feed(self) -> None:
        from daemon.shm import RingFullError
        from daemon.stages.ingest_file import IngestError

        m = self.d.metrics
        ingest = self._make_ingest()
        live = bool(getattr(ingest, "live", False))
        self.state = "running"
        unplaced = False
        try:
            async for fr in ingest.frames():
                idx = self._frame_index
                self._frame_index += 1
                m.frame_in(self.name)
                unplaced = True  # until the frame is in a window or counted
                self.last_frame_t = time.monotonic()
                completes = self.builder.needed == 1
                if live:
                    self.admission.note_arrival(fr.t_ingest, fr.pts)
                    verdict = self.admission.decide(completes, self.waiting, fr.pts)
                    if verdict is not Verdict.ADMIT:
                        unplaced = False
                        if verdict is Verdict.SKIP:
                            m.skip(self.name)
                        else:
                            m.drop(self.name, "queue_full")
                        continue
                elif completes:
                    await self._wait_for_space()
                ref = None
                while ref is None:
                    try:
                        ref = self.ring.write_frame(fr.image, idx, fr.pts)
                    except RingFullError:
                        if live:
                            break
                        await asyncio.sleep(0.01)
                unplaced = False
                if ref is None:
                    m.drop(self.name, "ring_full")
                    continue
                meta = FrameMeta(self._seq, idx, fr.pts, fr.t_ingest)
                self._seq += 1
                self.inflight[meta.seq] = meta
                if self.preview_on:
                    m.preview_in(self.name)
                    self._preview_pending.add(meta.seq)
                self.prior_q.put_nowait((ref, meta, self.builder.filling_id))
                win = self.builder.add(ref, meta)
                if win is not None:
                    self._emit(win)
        except asyncio.CancelledError:
            self.ingest_cut = True
            log.info("ingest stopped", extra={"source": self.name})
            if unplaced:
                m.drop(self.name, "shutdown")
        except IngestError as exc:
            self.state, self.error = "failed", str(exc)
            m.source_errors.labels(self.name, "ingest").inc()
            log.error("source failed: %s", exc, extra={"source": self.name})
        final = self.builder.finish()
        if final is not None:
            self._emit(final)
        self.prior_q.put_nowait(_END)
        await self.win_q.put(_END)

    async def _wait_for_space(self) -> None:
        async with self._space:
            await self._space.wait_for(lambda: self.waiting < self.admission.bound)

    def _emit(self, win: Window) -> None:
        fps = win.fps
        for meta in win.new_metas:
            meta.window_fps = fps
        if fps:
            self.d.metrics.set_window_fps(self.name, fps)
        self.waiting += 1
        self.win_q.put_nowait(win)

    # ---- prior -----------------------------------------------------------------------------------------
    async def _prior_batches(self) -> None:
        """The prior of each admitted frame as it arrives, in batches of at most ``streaming.preview_batch``
        (what is queued, never waiting for more), then its preview. A failed batch is retried by the window's
        prior request (_prior_loop) and its previews are dropped (counted)."""
        batch_max = self.d.cfg.streaming.preview_batch
        try:
            end = False
            while not end:
                item = await self.prior_q.get()
                if item is _END:
                    break
                batch = [item]
                while len(batch) < batch_max and not self.prior_q.empty():
                    nxt = self.prior_q.get_nowait()
                    if nxt is _END:
                        end = True
                        break
                    batch.append(nxt)
                need = [r for r, _, _ in batch if not self.ring.has_prior(r)]
                ok = True
                try:
                    if need:
                        await self.d.sidecar.compute(self.ring, need)
                except Exception as exc:  # the window's own prior request retries these frames
                    ok = False
                    log.warning("prior of arriving frames failed", extra={"source": self.name,
                                                                         "error": str(exc)})
                # copy the priors out before the window may go on (and release its slots)
                copies = [self._copy_prior(ref, meta) if ok and self.preview_on else None
                          for ref, meta, _ in batch]
                self._prior_upto = batch[-1][1].seq + 1
                async with self._prior_cond:
                    self._prior_cond.notify_all()
                if self.preview_on:
                    for (_, meta, wid), prior in zip(batch, copies):
                        if prior is not None:
                            await self._preview(prior, meta, wid)
                        elif meta.seq in self._preview_pending:
                            self._preview_pending.discard(meta.seq)
                            self.d.metrics.preview_drop(self.name, "prior_error" if not ok else "stale_slot")
        finally:
            self._batcher_done = True
            async with self._prior_cond:
                self._prior_cond.notify_all()

    def _copy_prior(self, ref: Any, meta: FrameMeta) -> tuple[Any, Any] | None:
        try:
            points = self.ring.prior_points(ref).copy()
            mask = self.ring.prior_mask(ref).copy()
            self.ring.verify(ref)
        except Exception as exc:  # the slot was reused (cannot happen while its window waits for it)
            log.warning("preview lost", extra={"source": self.name, "seq": meta.seq, "error": str(exc)})
            return None
        return points, mask

    async def _preview(self, prior: tuple[Any, Any], meta: FrameMeta, window_id: int) -> None:
        m = self.d.metrics
        points, mask = prior
        self.preview_scale.observe_prior(meta.seq, points[..., 2], mask)
        res = await asyncio.to_thread(make_preview, points, mask, self.preview_scale.scale, meta.frame_index,
                                      window_id)
        if self.d.hub is not None:
            self.d.hub.push(self.name, res, meta.pts, time.monotonic() - meta.t_ingest, tier="preview")
        if self.d.mqtt is None:
            self._preview_pending.discard(meta.seq)
            m.preview_out(self.name, time.monotonic() - meta.t_ingest)
            return

        self._preview_pending.discard(meta.seq)  # handed to the publisher: its outcome counts it

        def done(ok: bool, reason: str) -> None:
            if ok:
                m.preview_out(self.name, time.monotonic() - meta.t_ingest)
            else:
                m.preview_drop(self.name, f"mqtt_{reason}")

        await self.d.mqtt.publish_preview(self.name, res, meta.pts, on_done=done)

    async def _wait_frame_priors(self, win: Window) -> None:
        last = win.metas[-1].seq
        async with self._prior_cond:
            await self._prior_cond.wait_for(lambda: self._prior_upto > last or self._batcher_done)

    async def _prior_loop(self) -> None:
        m = self.d.metrics
        while (win := await self.win_q.get()) is not _END:
            if self.state == "failed":  # the prior stage gave up on this source: count, do not compute
                win.prior_ok = False
                await self.geo_q.put(win)
                continue
            await self._wait_frame_priors(win)
            need = [r for r in win.refs if not self.ring.has_prior(r)]
            t0 = time.monotonic()
            try:
                if need:
                    await self._compute_prior(need)
            except SourceFailed as exc:
                self.state, self.error = "failed", str(exc)
                m.source_errors.labels(self.name, "prior").inc()
                log.error("source failed: %s", exc, extra={"source": self.name})
                self.stop_ingest()
                win.prior_ok = False
            except Exception as exc:  # PriorError and friends: this window cannot be processed
                log.error("prior failed for window", extra={"source": self.name, "window": win.window_id,
                                                            "error": str(exc)})
                win.prior_ok = False
            win.prior_s = time.monotonic() - t0
            m.observe_stage("prior", self.name, win.prior_s)
            await self.geo_q.put(win)
        await self.geo_q.put(_END)

    async def _compute_prior(self, refs: list[Any]) -> None:
        """Prior for ``refs``. With the sidecar's restart budget exhausted a file source FAILS (raises
        SourceFailed: draining it into drops would report success) and a live source waits until the
        budget window frees a restart (new frames meanwhile go through the overload policy)."""
        from daemon.stages.prior import SidecarBudgetExhausted

        sidecar = self.d.sidecar
        while True:
            try:
                await sidecar.compute(self.ring, refs)
                return
            except SidecarBudgetExhausted as exc:
                if self.src.type == "file" or self.d.stop_event.is_set():
                    raise SourceFailed(str(exc)) from exc
                wait = max(0.1, sidecar.budget_wait_s())
                log.warning("prior sidecar restart budget exhausted; waiting for the budget window",
                            extra={"source": self.name, "wait_s": round(wait, 1)})
                with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                    await asyncio.wait_for(self.d.stop_event.wait(), wait)

    # ---- geometry + publish ----------------------------------------------------------------------------
    async def _geometry_loop(self) -> None:
        from daemon.stages.geometry import GeometryFault, GeometryUnavailable

        m = self.d.metrics
        worker = self.d.worker
        while (win := await self.geo_q.get()) is not _END:
            self.waiting -= 1
            async with self._space:
                self._space.notify_all()
            if not win.prior_ok:  # its new frames are lost, and counted
                self._drop_frames(win.new_metas, "prior_error")
                self._release(win)
                continue
            t0 = time.monotonic()
            self.in_geometry = True
            try:
                results = await worker.push_window(self.name, self.ring, win.refs, win.first_seq)
            except GeometryUnavailable as exc:
                self._drop_through(win, worker.last_fault or "geometry_crash")
                self._release(win)
                self.d.fatal(str(exc))
                raise _SourceFailed(str(exc)) from None
            except GeometryFault as exc:  # retried once on a restarted worker: the window is dropped
                self._drop_through(win, exc.reason)
                self._release(win)
                self._session_gen = worker.generation
                self.error = str(exc)
                continue
            except Exception as exc:
                log.exception("geometry failed for window", extra={"source": self.name,
                                                                   "window": win.window_id})
                self._drop_frames(win.new_metas, "geometry_error")
                self._release(win)
                self.error = str(exc)
                continue
            finally:
                self.in_geometry = False
            dt = time.monotonic() - t0
            if self._session_gen != worker.generation:  # restarted: our held-back frames died with it
                self._drop_before(win.first_seq, worker.last_fault or "geometry_crash")
                self._session_gen = worker.generation
            self.d.progress.progress(time.monotonic())
            m.observe_stage("geometry", self.name, dt)
            m.windows.labels(self.name).inc()
            self.windows_done += 1
            self.admission.note_window(win.n_new, max(dt, win.prior_s), win.window_id)  # the two stages overlap
            self._release(win)
            await self._publish(results)
        try:
            results = await worker.flush(self.name)
        except GeometryUnavailable as exc:
            self.d.fatal(str(exc))
            results = []
        except GeometryFault:
            results = []
        await self._publish(results)
        if self._session_gen != worker.generation and self.inflight:  # held back by a worker that died
            self._drop_before(self._seq, worker.last_fault or "geometry_crash")
        for ref in self.builder.release_carry():
            self.ring.release(ref)

    def _drop_before(self, seq: int, reason: str) -> None:
        """Count admitted frames below ``seq`` that have no result (held back in a lost session)."""
        lost = [s for s in self.inflight if s < seq]
        for s in lost:
            del self.inflight[s]
        if lost:
            log.warning("frames held by the lost geometry session dropped",
                        extra={"source": self.name, "frames": len(lost), "reason": reason})
        self.d.metrics.drop(self.name, reason, len(lost))

    def _drop_through(self, win: Window, reason: str) -> None:
        """A window that failed for good: its frames and every earlier frame still without a result."""
        self._drop_before(win.metas[-1].seq + 1, reason)

    def _release(self, win: Window) -> None:
        for ref in self.builder.done(win):
            self.ring.release(ref)

    def _drop_frames(self, metas: list[FrameMeta], reason: str) -> None:
        n = sum(1 for meta in metas if self.inflight.pop(meta.seq, None) is not None)
        self.d.metrics.drop(self.name, reason, n)

    async def _publish(self, results: list[Any]) -> None:
        """Hand a window's final frames to the sinks. A frame counts as out once every sink has it (for MQTT:
        once all its messages were published, reported by the publisher's ``on_done``), else as dropped."""
        m = self.d.metrics
        t0 = time.monotonic()
        batch: list[Any] = []
        metas: dict[int, FrameMeta] = {}
        for res in results:
            meta = self.inflight.pop(res.frame_index, None)
            if meta is None:
                log.debug("result for an already accounted frame", extra={"source": self.name,
                                                                         "seq": res.frame_index})
                continue
            self.preview_scale.observe_refined(meta.seq, float(getattr(res, "prior_scale", 1.0)))
            res = dataclasses.replace(res, frame_index=meta.frame_index)
            if self.d.hub is not None:  # live viewer (keeps a reference; encodes only while watched)
                self.d.hub.push(self.name, res, meta.pts, time.monotonic() - meta.t_ingest, tier="refined")
            if self.d.files is not None:
                try:
                    await asyncio.to_thread(self.d.files.write_frame, self.name, res, meta.pts)
                except Exception as exc:
                    log.error("file sink failed", extra={"source": self.name, "error": str(exc)})
                    m.drop(self.name, "files")
                    continue
            if self.d.mqtt is None:
                m.frame_out(self.name, time.monotonic() - meta.t_ingest)
                continue
            batch.append(res)
            metas[res.frame_index] = meta

        def done(res: Any, ok: bool, reason: str) -> None:
            meta = metas.pop(res.frame_index)
            if ok:
                m.frame_out(self.name, time.monotonic() - meta.t_ingest)
            else:
                m.drop(self.name, f"mqtt_{reason}")

        if batch:
            extra = [{"window_fps": f"{metas[r.frame_index].window_fps:.4f}"} for r in batch]
            await self.d.mqtt.publish_frames(self.name, batch, [metas[r.frame_index].pts for r in batch],
                                             on_done=done, extra=extra)
        if results:
            m.observe_stage("publish", self.name, time.monotonic() - t0)
