"""One source's data flow, in order: feeder (ingest -> FrameRing -> windows + admission) -> prior tasks
(per-frame priors as frames arrive, previews; per-window prior slots) -> geometry -> publishers.

The supervisor builds one :class:`SourceRunner` per configured source once every shared part has started and
hands it those parts as :class:`Collaborators` (typed, no back-reference to the daemon). Queues carry only
windows of slot refs; every ingested frame ends as exactly one of: published (frames_out), skipped,
dropped{reason}.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from daemon.config import Config, Source
from daemon.frames import FrameMeta
from daemon.intrinsics import normalise_pixel_intrinsics
from daemon.metrics import Metrics
from daemon.progress import ProgressMonitor
from daemon.shm import FrameRing, RingFullError
from daemon.stages.colour_stash import ColourStash
from daemon.stages.geometry import GeometryFault, GeometryUnavailable, GeometryWorker
from daemon.stages.ingest_file import FileIngest, IngestError
from daemon.stages.ingest_rtsp import RtspIngest
from daemon.stages.preview import PreviewScale, make_preview
from daemon.stages.prior import PriorSidecar, SidecarBudgetExhausted
from daemon.stages.window import Admission, Verdict, Window, WindowBuilder

if TYPE_CHECKING:
    from daemon.stages.ingest_webrtc import WebrtcSources
    from daemon.stages.publish_files import FileSink
    from daemon.stages.publish_foxglove import FoxgloveLive
    from daemon.stages.publish_mcap import McapRecorder
    from daemon.stages.publish_mqtt import MqttPublisher
    from daemon.viewer.hub import ResultsHub

log = logging.getLogger(__name__)

_END = None  # queue sentinel: no more windows


class SourceFailed(Exception):
    """A stage gave up on one source (the source's state becomes ``failed``; the daemon keeps running)."""


class FatalSourceError(Exception):
    """A source's task group ends for a reason the daemon already logged as fatal (no traceback)."""


@dataclass(frozen=True)
class Collaborators:
    """The shared parts a source's tasks use, all started before any runner exists."""

    cfg: Config
    metrics: Metrics
    sidecar: PriorSidecar
    worker: GeometryWorker
    progress: ProgressMonitor
    stop_event: asyncio.Event
    fatal: Callable[[str], None]  # an unrecoverable fault: the daemon stops and exits 1
    degraded_reasons: Callable[[], list[str]]
    mqtt: MqttPublisher | None = None
    files: FileSink | None = None
    hub: ResultsHub | None = None
    webrtc: WebrtcSources | None = None
    mcap: McapRecorder | None = None
    foxglove: FoxgloveLive | None = None


class SourceRunner:
    """One source's task group: feeder (ingest -> ring -> windows), prior task, geometry+publish task."""

    def __init__(self, parts: Collaborators, name: str, src: Source) -> None:
        self.d, self.name, self.src = parts, name, src
        cfg = parts.cfg
        self.builder = WindowBuilder(cfg.geometry.window_size, cfg.geometry.overlap)
        self.admission = Admission(cfg.overload.policy, cfg.overload.max_queued_windows)
        self.ring: FrameRing | None = None
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
        self.preview_on = src.preview and (cfg.mqtt.enabled or cfg.http.enabled)
        self.preview_scale = PreviewScale(cfg.streaming.cut_threshold)
        self._preview_pending: set[int] = set()  # seqs whose preview was not yet handed to a sink
        wants_colour = any(s is not None and s.colour for s in (parts.mcap, parts.foxglove))
        self.colours = ColourStash(4 * cfg.geometry.window_size) if wants_colour else None
        self.intrinsics: tuple[float, ...] | None = None  # src.intrinsics normalised for the decoded size
        self._intrinsics_size: tuple[int, int] | None = None

    @property
    def _ring(self) -> FrameRing:
        """The source's ring, which the supervisor creates before :meth:`run`."""
        assert self.ring is not None, f"source {self.name}: no ring yet"
        return self.ring

    def _make_ingest(self) -> Any:
        g = self.d.cfg.geometry
        src = self.src
        if src.type == "file":
            return FileIngest(self.name, src.path, g.height, g.width, loop=src.loop, realtime=src.realtime)
        if src.type == "rtsp":
            m = self.d.metrics

            def on_reconnect() -> None:
                self.reconnects += 1
                m.source_reconnects.labels(self.name).inc()

            return RtspIngest(self.name, src, g.height, g.width, on_reconnect=on_reconnect,
                              on_up=lambda up: m.source_up.labels(self.name).set(1 if up else 0),
                              on_error=lambda kind: m.source_errors.labels(self.name, kind).inc())
        if src.type == "webrtc" and self.d.webrtc is not None:  # sessions arrive through WHIP (ingest_webrtc)
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
        except FatalSourceError as exc:  # already logged as the daemon's fatal reason
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
        m = self.d.metrics
        ingest = self._make_ingest()
        live = bool(getattr(ingest, "live", False))
        self.state = "running"
        unplaced = False
        try:
            async for fr in ingest.frames():
                if self.src.intrinsics is not None and fr.source_size != self._intrinsics_size:
                    self._set_intrinsics(fr.source_size)  # before frames_in: a failing frame is not admitted
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
                        ref = self._ring.write_frame(fr.image, idx, fr.pts)
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
                if self.colours is not None:
                    self.colours.put(meta.seq, fr.image)
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

    def _set_intrinsics(self, size: tuple[int, int]) -> None:
        """Normalise the configured pixel intrinsics for the decoded size (on the first frame and when the
        size changes); a principal point outside the frame fails the source (IngestError)."""
        try:
            self.intrinsics = normalise_pixel_intrinsics(self.src.intrinsics or (), *size)
        except ValueError as exc:
            raise IngestError(f"source {self.name}: intrinsics {self.src.intrinsics} do not fit the decoded "
                              f"size {size[1]}x{size[0]}: {exc}") from None
        self._intrinsics_size = size
        log.info("known intrinsics", extra={"source": self.name, "size": f"{size[1]}x{size[0]}",
                                            "normalised": [round(v, 6) for v in self.intrinsics]})

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
                need = [r for r, _, _ in batch if not self._ring.has_prior(r)]
                ok = True
                try:
                    if need:
                        await self.d.sidecar.compute(self._ring, need)
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
            points = self._ring.prior_points(ref).copy()
            mask = self._ring.prior_mask(ref).copy()
            self._ring.verify(ref)
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
            need = [r for r in win.refs if not self._ring.has_prior(r)]
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
        sidecar = self.d.sidecar
        while True:
            try:
                await sidecar.compute(self._ring, refs)
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
                results = await worker.push_window(self.name, self._ring, win.refs, win.first_seq,
                                                   self.intrinsics)
            except GeometryUnavailable as exc:
                self._drop_through(win, worker.last_fault or "geometry_crash")
                self._release(win)
                self.d.fatal(str(exc))
                raise FatalSourceError(str(exc)) from None
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
            self.admission.note_window(win.n_new, max(dt, win.prior_s),
                                       win.window_id)  # the two stages overlap
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
            self._ring.release(ref)

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
            self._ring.release(ref)

    def _drop_frames(self, metas: list[FrameMeta], reason: str) -> None:
        n = sum(1 for meta in metas if self.inflight.pop(meta.seq, None) is not None)
        self.d.metrics.drop(self.name, reason, n)

    async def _record(self, res: Any, meta: FrameMeta) -> bool:
        """The MCAP recording (a failure drops the frame, reason ``mcap``) and the live Foxglove view (best
        effort: a failure is logged and counted by the sink, the frame goes on)."""
        jpeg = self.colours.take(meta.seq) if self.colours is not None else None
        if self.d.mcap is not None:
            try:
                await asyncio.to_thread(self.d.mcap.write_frame, self.name, res, meta.pts, None, jpeg)
            except Exception as exc:
                log.error("mcap sink failed", extra={"source": self.name, "error": str(exc)})
                self.d.metrics.drop(self.name, "mcap")
                return False
        if self.d.foxglove is not None and self.d.foxglove.watched(self.name):
            try:
                await asyncio.to_thread(self.d.foxglove.write_frame, self.name, res, meta.pts, None, jpeg)
            except Exception as exc:
                log.warning("foxglove live view failed", extra={"source": self.name, "error": str(exc)})
        return True

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
            res = replace(res, frame_index=meta.frame_index)
            if self.d.hub is not None:  # live viewer (keeps a reference; encodes only while watched)
                self.d.hub.push(self.name, res, meta.pts, time.monotonic() - meta.t_ingest, tier="refined")
            if self.d.files is not None:
                try:
                    await asyncio.to_thread(self.d.files.write_frame, self.name, res, meta.pts)
                except Exception as exc:
                    log.error("file sink failed", extra={"source": self.name, "error": str(exc)})
                    m.drop(self.name, "files")
                    continue
            if not await self._record(res, meta):
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
            assert self.d.mqtt is not None  # batch only fills when there is a publisher
            extra = [{"window_fps": f"{metas[r.frame_index].window_fps:.4f}"} for r in batch]
            await self.d.mqtt.publish_frames(self.name, batch, [metas[r.frame_index].pts for r in batch],
                                             on_done=done, extra=extra)
        if results:
            m.observe_stage("publish", self.name, time.monotonic() - t0)
