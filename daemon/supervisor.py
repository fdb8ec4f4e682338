"""The daemon: signals -> startup (one AsyncExitStack) -> serve + tick -> shutdown (uvicorn-style).

Order (docs/architecture.md, style.md "asyncio lifecycle"): capture signals -> HTTP server (/healthz says
"starting") -> stale shm cleanup -> prior sidecar -> geometry worker process: pipeline load + warm-up window
(kernels compile before READY) -> publishers -> one ring + :class:`~daemon.stages.runner.SourceRunner` per
source, handed the started parts -> ``READY=1`` -> main loop with a periodic tick (``WATCHDOG=1`` while
windows complete, loop lag, gauges) -> on SIGTERM/SIGINT or when every file source is done
(``--exit-when-done``): ``STOPPING=1``, stop ingest, finish and flush windows within
``daemon.shutdown_grace_s``, flush publishers, stop the sidecar, unlink shared memory, exit 0. Every setup
step registers its teardown on one ``AsyncExitStack`` so teardown runs in reverse order on every path.
The command line around it (config, logging, --summary) is daemon/commands/run.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from daemon import sdnotify
from daemon.http import HttpServer
from daemon.metrics import Metrics
from daemon.progress import STALLED, ProgressMonitor
from daemon.shm import FrameRing, check_shm_room, cleanup_stale_segments, ring_bytes
from daemon.stages.geometry import GeometryWorker, ProcessorSpec
from daemon.stages.prior import PriorSidecar, cleanup_stale_prior_dirs
from daemon.stages.publish_files import FileSink
from daemon.stages.publish_mqtt import MqttPublisher
from daemon.stages.runner import Collaborators, SourceRunner
from daemon.stages.window import Admission, ring_slots
from daemon.status import LagStats, quantiles
from daemon.viewer.setup import build_web

log = logging.getLogger(__name__)


class _StoppedDuringStartup(Exception):
    pass


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
        self.mcap: Any = None  # daemon.stages.publish_mcap.McapRecorder
        self.foxglove: Any = None  # daemon.stages.publish_foxglove.FoxgloveLive
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
            self.webrtc, self.hub, web_setup = build_web(cfg, self.metrics)  # WHIP ingest + live viewer
            stack.push_async_callback(self.webrtc.close)
            stack.push_async_callback(self.hub.close)
            http = HttpServer(cfg.http.bind, cfg.http.port, self.metrics.render, self.health, cfg.http.token,
                              web_setup, cfg.http)
            await stack.enter_async_context(http)
            log.info("http listening", extra={"bind": cfg.http.bind, "port": http.port})

        removed = await asyncio.to_thread(cleanup_stale_segments)
        if removed:
            log.info("removed stale shared memory", extra={"segments": ",".join(removed)})
        removed = await asyncio.to_thread(cleanup_stale_prior_dirs)
        if removed:
            log.info("removed stale prior sidecar folders", extra={"folders": ",".join(removed)})
        g = cfg.geometry
        bound = Admission(cfg.overload.policy, cfg.overload.max_queued_windows).bound
        slots = {name: ring_slots(g.window_size, g.overlap, bound, cfg.daemon.shm_slack_frames)
                 for name in cfg.sources}
        check_shm_room(sum(ring_bytes(n, g.height, g.width) for n in slots.values()))  # before any model load

        await self._start_sidecar(stack)
        await self._load_pipeline(stack)
        await self._start_publishers(stack)

        parts = Collaborators(cfg=cfg, metrics=self.metrics, sidecar=self.sidecar, worker=self.worker,
                              progress=self.progress, stop_event=self.stop_event, fatal=self.fatal,
                              degraded_reasons=self.degraded_reasons, mqtt=self.mqtt, files=self.files,
                              hub=self.hub, webrtc=self.webrtc, mcap=self.mcap, foxglove=self.foxglove)
        for name, src in cfg.sources.items():
            runner = SourceRunner(parts, name, src)
            n_slots = slots[name]
            runner.ring = FrameRing.create(name, n_slots, g.height, g.width)
            stack.push_async_callback(self._close_ring, runner.ring)
            self.runners[name] = runner
            log.info("source ready", extra={"source": name, "type": src.type, "ring": runner.ring.name,
                                            "slots": n_slots})

    async def _start_sidecar(self, stack: contextlib.AsyncExitStack) -> None:
        ckpt = self.cfg.prior_checkpoint()
        lg = self.cfg.logging
        # interpreter: prior.python or ours
        self.sidecar = PriorSidecar(self.cfg.prior, ckpt, log_level=lg.level,
                                    log_format=lg.format, moge_version=self.cfg.moge_version())
        log.info("starting prior sidecar", extra={"checkpoint": str(ckpt), "model": self.cfg.prior.model})
        await self.sidecar.start()
        stack.push_async_callback(self._stop_sidecar)

    async def _stop_sidecar(self) -> None:
        with contextlib.suppress(Exception):
            await self.sidecar.stop()

    async def _load_pipeline(self, stack: contextlib.AsyncExitStack) -> None:

        cfg = self.cfg
        if self.identity_delay is not None:
            log.warning("PLUMBING-ONLY identity geometry selected: outputs are the prior, "
                        "not GeometryCrafter")
        spec = ProcessorSpec.from_config(cfg, self.identity_delay)
        self.worker = GeometryWorker(spec)
        self.worker.on_unavailable = self.fatal
        stack.push_async_callback(self.worker.stop)
        log.info("loading pipeline in the geometry worker process",
                 extra={"model_dir": cfg.model.dir, "variant": cfg.model.variant, "dtype": cfg.model.dtype,
                        "processor": spec.kind})
        secs = await self.worker.start()
        log.info("pipeline loaded; warming up (compiles kernels)",
                 extra={"seconds": round(secs, 2), "frames": cfg.geometry.window_size,
                        "size": f"{cfg.geometry.height}x{cfg.geometry.width}"})
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
            self.mqtt = await stack.enter_async_context(MqttPublisher(cfg.mqtt, names, self.metrics))
        if cfg.files.enabled:
            self.files = FileSink(cfg.files)
            stack.callback(self.files.close)
        if cfg.mcap.enabled:
            from daemon.stages.publish_mcap import McapRecorder

            self.mcap = McapRecorder(cfg.mcap, cfg.files.dir, self.metrics)
            stack.callback(self.mcap.close)
        if cfg.foxglove.enabled:
            from daemon.stages.publish_foxglove import FoxgloveLive

            self.foxglove = await stack.enter_async_context(FoxgloveLive(cfg, names, self.metrics))

    async def _serve(self) -> int:
        tasks = {name: asyncio.create_task(r.run(), name=f"source-{name}")
                 for name, r in self.runners.items()}
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
                log.warning("shutdown grace exceeded; cancelling",
                            extra={"task": t.get_name(), "grace_s": grace})
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
        worker_alive = self.worker is not None and self.worker.alive
        return self.progress_reasons(now) + self.service_reasons(self._sidecar_up(), worker_alive)

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
                                    "latency_s": quantiles(c.latencies),
                                    "previews": {"in": c.previews_in, "out": c.previews_out,
                                                 "dropped": dict(c.previews_dropped),
                                                 "balanced": c.previews_balanced(),
                                                 "latency_s": quantiles(c.preview_latencies)},
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



def _close_ring(ring: Any) -> None:
    for op in (ring.close, ring.unlink):
        try:
            op()
        except (BufferError, FileNotFoundError) as exc:  # a view still alive in an abandoned thread
            log.warning("ring cleanup", extra={"ring": ring.name, "error": str(exc)})
            if op is ring.close:
                continue
