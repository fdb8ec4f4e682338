"""The one offline code path (`geometryd process`, `geometryd batch` workers): decode -> MoGe priors ->
GeometryCrafter -> outputs, streamed so that memory does not grow with decoded frames (issue #18).

Upstream (run.py, diff_ppl.py) holds the whole clip: frames, priors and outputs at the source size. Here:

1. decode (:func:`prepare_clip`): frames arrive one at a time and go straight into the prior ring; a full
   ring (``PriorClient.batch`` frames) is one sidecar request; the source-size priors feed the clip-global
   statistics (:class:`daemon.model.prior_post.StatsAccumulator`) and wait on disk (:class:`PriorSpill`):
   the statistics are known only after the last frame, and the prior cannot be shrunk before them. The
   frames are kept only as the encoder reads them: at the processing size, or as uint8 when that is smaller.
2. prior post-processing reads the spill back a frame at a time into x4 at the processing size.
3. encode + denoise (``GeometryCrafter.offline_latents``) at the processing size.
4. decode (``decode_chunk`` frames per decoder call) + post (:func:`geometry_chunks`) a few frames at a
   time: the decoder heads stay at the processing size, the clip-global focal (spec 4.7 step 4) is summed
   chunk by chunk in numpy's own order (:class:`BufferedMean`), and output frames go to the sinks as they
   complete.

What grows with the clip: per frame, the encoder input, x4 and the three decoder heads at the processing
size, and the output mask at the output size (1 byte per pixel: the npz writes it after the point map).
The results are the values of ``GeometryCrafter.__call__``: the same numpy/BLAS calls, on fewer frames at
a time where frames are big; that a resize's values do not depend on how many frames it is given is checked
in tests/commands/test_process_input.py, and outputs were compared bit for bit with 0.2.0's. With
``downsample_ratio`` > 1 the shrink and the upsampling back run per frame instead of on the whole clip:
equal on the sizes tested, not proven for every size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from daemon.intrinsics import normalise_pixel_intrinsics, project_known
from daemon.model.downsample import downsample_frames, downsampled_size, quantize_frames, upsample_output
from daemon.model.prior_post import StatsAccumulator, prior_to_x4_frames
from daemon.offline.options import ProcessOptions, UsageError
from daemon.offline.priors import PriorClient
from daemon.offline.spill import PriorSpill
from daemon.pipeline import (
    GeometryCrafter,
    _Stages,
    decode_post,
    frames_at_size,
    normalised_intrinsics,
    points_from_maps,
    projected_focal,
)
from daemon.video import VideoError, iter_frames, probe

log = logging.getLogger(__name__)

# Host glue at the source size (prior post-processing, decode post-processing) runs on as many frames at once
# as keep one float32 map under this many bytes: one frame at 3840x2160, 8 at 1920x1080 (the results do not
# depend on it, tests/commands/test_process_input.py).
HOST_CHUNK_BYTES = 64 << 20


def host_frames(height: int, width: int, most: int) -> int:
    return max(1, min(most, HOST_CHUNK_BYTES // (height * width * 4)))


@dataclass
class PreparedClip:
    """A decoded clip with its prior, ready for the networks."""

    frames: np.ndarray  # encoder input: (T,3,H,W) float32 at the processing size, or (T,h,w,3) uint8
    x4: np.ndarray  # (T,4,H,W) float32 prior at the processing size
    size: tuple[int, int]  # processing (H, W)
    src: tuple[int, int]  # size of the frames the pipeline saw (after --downsample-ratio)
    out: tuple[int, int]  # output size = the source size
    fps: float
    timings: dict[str, float] = field(default_factory=dict)

    t: int = 0


@dataclass
class OutputChunk:
    """Consecutive output frames [start, start + n) at the output size."""

    start: int
    point_map: np.ndarray  # (n,H0,W0,3) float32
    mask: np.ndarray  # (n,H0,W0) bool
    depth: np.ndarray  # (n,H0,W0) float32
    intrinsics: np.ndarray  # (n,4) float32 (daemon.frames.FrameResult)


class OutputSink(Protocol):
    """One output format: ``begin`` once, ``add`` per chunk in frame order, ``end`` once (or ``abort``)."""

    def begin(self, frames: int, height: int, width: int, fps: float) -> None: ...
    def add(self, chunk: OutputChunk) -> None: ...
    def end(self) -> None: ...
    def abort(self) -> None: ...


def check_sizes(h0: int, w0: int, opts: ProcessOptions) -> tuple[tuple[int, int], tuple[int, int]]:
    """(processing size, pipeline frame size) for a source of h0 x w0; UsageError (one line) otherwise."""
    height, width = (opts.height, opts.width) if opts.height else (h0, w0)
    if height % 64 or width % 64:
        raise UsageError(f"source size {w0}x{h0} is not a multiple of 64: give --height and --width")
    if h0 % 2 or w0 % 2:
        raise UsageError(f"source size {w0}x{h0} must be even in both dimensions")
    if not 0.5 <= width / height <= 2.0:
        raise UsageError(f"processing aspect ratio {width}x{height} is outside [0.5, 2]")
    src = (h0, w0)
    if opts.downsample_ratio > 1.0:  # run.py: after choosing the processing size, before the pipeline
        hs, ws = downsampled_size(h0, w0, opts.downsample_ratio)
        if hs < 2 or ws < 2 or hs % 2 or ws % 2:
            raise UsageError(f"--downsample-ratio {opts.downsample_ratio} gives frames {ws}x{hs}: "
                             "both must be even and >= 2")
        src = (hs, ws)
    return (height, width), src


class _Frames:
    """The encoder input, appended in chunks, stored in one array grown in blocks."""

    def __init__(self, expected: int) -> None:
        self._buf: np.ndarray | None = None
        self.n = 0
        self._expected = max(expected, 1)

    def append(self, x: np.ndarray) -> None:
        if self._buf is None:
            self._buf = np.empty((self._expected, *x.shape[1:]), x.dtype)
        if self.n + len(x) > len(self._buf):
            grown = np.empty((max(self.n + len(x), len(self._buf) + max(16, len(self._buf) // 4)),
                              *x.shape[1:]), x.dtype)
            grown[: self.n] = self._buf[: self.n]
            self._buf = grown
        self._buf[self.n : self.n + len(x)] = x
        self.n += len(x)

    def array(self) -> np.ndarray:
        assert self._buf is not None
        return self._buf[: self.n]


class _ClipReader:
    """Stage 1 for one clip: frames in, prior batches out to the sidecar, encoder input kept."""

    def __init__(self, opts: ProcessOptions, priors: PriorClient, expected: int,
                 spill_dir: str | None) -> None:
        self.opts, self.priors, self.spill_dir = opts, priors, spill_dir
        self.acc = StatsAccumulator()
        self.store = _Frames(expected)
        self.spill: PriorSpill | None = None
        self.size = self.src = self.out = (0, 0)
        self._batch = 1
        self._frames = 0
        self._enc_group = 1
        self._enc_frames: list[np.ndarray] = []
        self.prior_s = 0.0

    def add(self, img: np.ndarray) -> None:
        if self.spill is None:  # the first frame fixes the sizes
            self.out = (img.shape[0], img.shape[1])
            self.size, self.src = check_sizes(img.shape[0], img.shape[1], self.opts)
            self.spill = PriorSpill(self.src[0], self.src[1], self.spill_dir)
            self._batch = self.priors.batch(*self.src)
            # the encoder resizes decode_chunk frames per call; big frames are resized one at a time as they
            # arrive instead (the same values: the resize of a frame does not depend on its batch,
            # tests/commands/test_process_input.py), so that no group of source frames waits
            dc = self.opts.decode_chunk
            self._enc_group = dc if host_frames(self.src[0], 3 * self.src[1], dc) == dc else 1
        frame, prior_frame = img[None], img
        if self.src != self.out:
            frame = downsample_frames(frame, self.opts.downsample_ratio)
            prior_frame = quantize_frames(frame)[0]
        if self.priors.put(prior_frame, self._frames) == self._batch:
            self._flush_priors()
        self._frames += 1
        self._enc_frames.append(frame)
        if len(self._enc_frames) == self._enc_group:
            self._flush_frames()

    def finish(self) -> None:
        self._flush_priors()
        if self._enc_frames:
            self._flush_frames()

    def _flush_priors(self) -> None:
        t0 = time.perf_counter()
        self.priors.flush(self._keep_prior)
        self.prior_s += time.perf_counter() - t0

    def _keep_prior(self, _k: int, points: np.ndarray, mask: np.ndarray) -> None:
        assert self.spill is not None
        self.acc.add(points[..., 2], mask)
        self.spill.append(points[None], mask[None])

    def _flush_frames(self) -> None:
        chunk = np.concatenate(self._enc_frames)
        self._enc_frames.clear()
        if chunk.dtype == np.uint8 and 4 * self.size[0] * self.size[1] >= self.src[0] * self.src[1]:
            self.store.append(chunk)  # smaller than at the processing size: the encoder resizes it itself
        else:  # the encoder's own call on the same decode_chunk group: the same values
            self.store.append(frames_at_size(chunk, self.size))

    def close(self) -> None:
        self.priors.end_clip()
        if self.spill is not None:
            self.spill.close()


def prepare_clip(video: Path, opts: ProcessOptions, priors: PriorClient, spill_dir: str | None = None,
                 stages: Any = None) -> PreparedClip:
    """Stages 1-2 of the module docstring. Raises UsageError (one line) for a file that cannot be
    processed."""
    stages = stages if stages is not None else _Stages(True)
    try:
        info = probe(video)
    except VideoError as exc:
        raise UsageError(str(exc)) from exc
    expected = info.frames // opts.stride + 1 if info.frames else 0
    if opts.max_frames > 0:
        expected = min(expected, opts.max_frames) if expected else opts.max_frames
    reader = _ClipReader(opts, priors, expected, spill_dir)
    t0 = time.perf_counter()
    try:
        try:
            for img in iter_frames(video, stride=opts.stride, max_frames=opts.max_frames):
                reader.add(img)
        except VideoError as exc:
            raise UsageError(str(exc)) from exc
        if reader.spill is None:
            raise UsageError(f"video {video} has no frames")
        reader.finish()
        spill, t = reader.spill, reader.acc.frames
        timings = {"decode_video": time.perf_counter() - t0 - reader.prior_s, "prior_moge": reader.prior_s}
        log.info("decoded %d frames %dx%d, priors in %.1f s", t, reader.out[1], reader.out[0], reader.prior_s)
        with stages.stage("prior", t):
            stats = reader.acc.finish(lambda i: _z_and_mask(spill.frame(i)))
            x4 = prior_to_x4_frames(spill.frame, t, reader.src, reader.size, stats)
    finally:
        reader.close()
    return PreparedClip(reader.store.array(), x4, reader.size, reader.src, reader.out, info.fps, timings, t)


def _z_and_mask(frame: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return frame[0][..., 2], frame[1]


class BufferedMean:
    """``np.mean(x, dtype=np.float64)`` of the concatenation of the float32 arrays given to :meth:`add`, to
    the bit: numpy sums a cast reduction one buffer (``np.getbufsize()`` elements) at a time, pairwise inside
    the buffer, and adds the buffer sums in order; the same blocks are summed here across calls."""

    def __init__(self) -> None:
        self._bufsize = np.getbufsize()
        self._carry = np.empty(0, np.float32)
        self._sum = np.float64(0.0)
        self._n = 0

    def add(self, x: np.ndarray) -> None:
        flat = np.ascontiguousarray(x, np.float32).reshape(-1)
        self._n += flat.size
        if self._carry.size:
            need = self._bufsize - self._carry.size
            head, flat = flat[:need], flat[need:]
            self._carry = np.concatenate([self._carry, head])
            if self._carry.size < self._bufsize:
                return
            self._sum += np.add.reduce(self._carry, dtype=np.float64)
            self._carry = np.empty(0, np.float32)
        whole = flat.size - flat.size % self._bufsize
        for s in range(0, whole, self._bufsize):
            self._sum += np.add.reduce(flat[s : s + self._bufsize], dtype=np.float64)
        self._carry = flat[whole:].copy()

    def mean(self) -> np.float64:
        total = self._sum
        if self._carry.size:
            total += np.add.reduce(self._carry, dtype=np.float64)
        return np.float64(total / self._n)


def _global_focal(heads: tuple[np.ndarray, np.ndarray, np.ndarray], out: tuple[int, int],
                  chunk: int, extract: bool) -> tuple[np.ndarray, np.ndarray]:
    """``projected_focal(maps, per_frame=False)`` over every frame, one chunk of maps at a time."""
    v_mean, fx_mean, fy_mean = BufferedMean(), BufferedMean(), BufferedMean()
    a, dl, vl = heads
    for s in range(0, a.shape[0], chunk):
        maps = decode_post(a[s : s + chunk], dl[s : s + chunk], vl[s : s + chunk], out, extract)
        v = maps.valid.astype(np.float32)
        v_mean.add(v)
        fx_mean.add(maps.fx * v)
        fy_mean.add(maps.fy * v)
    den = v_mean.mean().astype(np.float32) + np.float32(1e-4)
    fx = fx_mean.mean().astype(np.float32) / den
    fy = fy_mean.mean().astype(np.float32) / den
    return np.asarray(fx, np.float32), np.asarray(fy, np.float32)


def geometry_chunks(gc: GeometryCrafter, clip: PreparedClip, opts: ProcessOptions,
                    stages: Any = None) -> Iterator[OutputChunk]:
    """Stages 3-4: the output frames a few at a time (:func:`host_frames`), the values of
    ``GeometryCrafter.__call__``."""
    stages = stages if stages is not None else _Stages(True)
    t = clip.t
    window, overlap = (t, 0) if t <= opts.window else (opts.window, opts.overlap)  # run.py: short clip
    gc.low_memory_usage = opts.low_memory
    latents = gc.offline_latents(clip.frames, clip.x4, clip.size, window_size=window, overlap=overlap,
                                 num_inference_steps=opts.steps, guidance_scale=opts.guidance_scale,
                                 decode_chunk_size=opts.decode_chunk, noise=None, seed=opts.seed,
                                 stages=stages)
    clip.frames = clip.x4 = np.empty(0)  # encoded: not needed any more
    dc = opts.decode_chunk
    with stages.stage("decode", t) as tick:
        heads = gc.decode(gc.latents_to_z(latents), dc, tick)
    del latents
    src, out = clip.src, clip.out
    known = None
    if opts.intrinsics is not None:  # pixels of the source size -> the size-independent normalised form
        try:
            known = normalise_pixel_intrinsics(opts.intrinsics, out[0], out[1])
        except ValueError as exc:
            raise UsageError(f"--intrinsics: {exc}") from exc
    fixed = known is None and opts.force_projection and opts.force_fixed_focal
    with stages.stage("post", t):
        focal = _global_focal(heads, src, host_frames(*src, dc), opts.use_extract_interp) if fixed else None
    a, dl, vl = heads
    step = host_frames(*src, dc)
    for s in range(0, t, step):
        t0 = time.perf_counter()
        maps = decode_post(a[s : s + step], dl[s : s + step], vl[s : s + step], src, opts.use_extract_interp)
        if known is not None:  # they replace the estimated focal of the projection step
            points, depth = project_known(maps.log_depth, known)
            intr = np.tile(np.asarray(known, np.float32), (points.shape[0], 1))
        elif fixed:
            assert focal is not None
            fx, fy = focal
            points, depth = points_from_maps(maps, fx, fy)
            n = points.shape[0]
            fxs, fys = np.broadcast_to(fx, (n,)), np.broadcast_to(fy, (n,))
        elif opts.force_projection:
            fx, fy = projected_focal(maps, per_frame=True)
            points, depth = points_from_maps(maps, fx, fy)
            fxs, fys = fx, fy
        else:
            points, depth = points_from_maps(maps, maps.fx, maps.fy)
            fxs, fys = projected_focal(maps, per_frame=True)
        if known is None:
            intr = normalised_intrinsics(fxs, fys, src[0], src[1])
        mask = maps.valid
        del maps
        if src != out:
            points, mask = upsample_output(points, mask, out)
            depth = np.ascontiguousarray(points[..., 2])
        stages.timings["post"] = stages.timings.get("post", 0.0) + time.perf_counter() - t0
        yield OutputChunk(s, points, mask, depth, intr)


def write_outputs(chunks: Iterator[OutputChunk], sinks: list[OutputSink], frames: int, height: int,
                  width: int, fps: float) -> None:
    """Hand every chunk to every sink; a failure aborts all of them (no partial npz stays). Sinks must accept
    ``abort`` without ``begin``."""
    try:
        for sink in sinks:
            sink.begin(frames, height, width, fps)
        for chunk in chunks:
            for sink in sinks:
                sink.add(chunk)
        for sink in sinks:
            sink.end()
    except BaseException:
        for sink in sinks:
            try:
                sink.abort()
            except Exception:
                log.debug("sink abort failed", exc_info=True)
        raise


def run_video(model: Callable[[], GeometryCrafter], priors: PriorClient, video: Path, opts: ProcessOptions,
              sinks: Callable[[PreparedClip], list[OutputSink]], *, quiet: bool = True
              ) -> tuple[PreparedClip, dict[str, float]]:
    """The whole path for one file: decode + priors, then ``model()`` (loaded on first use, after the input
    proved processable), then the outputs into ``sinks(clip)``. Returns the clip and seconds per stage."""
    stages = _Stages(quiet)
    clip = prepare_clip(video, opts, priors, stages=stages)
    t0 = time.perf_counter()
    gc = model()
    load_s = time.perf_counter() - t0
    write_outputs(geometry_chunks(gc, clip, opts, stages), sinks(clip), clip.t, clip.out[0], clip.out[1],
                  clip.fps)
    timings = {**clip.timings, **({"load_model": load_s} if load_s > 0.01 else {}), **stages.timings}
    return clip, timings
