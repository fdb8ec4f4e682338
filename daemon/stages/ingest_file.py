"""File ingest (PyAV): decode a video file in a worker thread, resize every frame to the processing size.

Frames leave this module as ``IngestFrame`` (an RGB uint8 array of the processing size plus its pts); the
caller writes them into the source's shared-memory ring. ``realtime`` paces frames by their pts (a file that
behaves like a camera); ``loop`` restarts at the end with pts continuing. Without ``realtime`` the reader is
back-pressured by the caller (nothing is ever skipped or dropped for a non-live file).

A file that cannot be opened or decoded raises :class:`IngestError` (one line naming the file and the
FFmpeg error); the supervisor counts it and marks the source failed, the daemon stays up.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import numpy as np

from daemon.frames import IngestFrame

log = logging.getLogger(__name__)

_END = object()


class IngestError(RuntimeError):
    """A source cannot deliver frames (open or decode failure); the message names the source."""


class StallError(IngestError):
    """No frame arrived within the stall timeout."""


class ThreadedReader:
    """Run a blocking frame generator in its own daemon thread and hand items to asyncio.

    The thread blocks while the bounded queue is full (back-pressure for files). ``next_item(timeout)``
    raises :class:`StallError` when nothing arrives in time; ``abandon()`` tells the thread to stop at its
    next item (a thread blocked inside FFmpeg ends when FFmpeg's own read timeout fires).
    """

    def __init__(self, gen_fn: Callable[[], Iterator[object]], name: str, maxsize: int = 4) -> None:
        self._gen_fn = gen_fn
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[object] = asyncio.Queue(maxsize=maxsize)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        fut = asyncio.run_coroutine_threadsafe(self._queue.put(item), self._loop)
        while not self._stop.is_set():
            try:
                fut.result(timeout=0.2)
                return True
            except TimeoutError:
                continue
            except RuntimeError:  # loop closed
                return False
        fut.cancel()
        return False

    def _run(self) -> None:
        try:
            for item in self._gen_fn():
                if self._stop.is_set() or not self._put(item):
                    return
            self._put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the async side, which raises it
            if not self._stop.is_set():
                self._put(exc)

    async def next_item(self, timeout: float | None = None) -> object:
        """The next item, ``None`` at the end; re-raises the thread's exception."""
        try:
            item = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            raise StallError(f"no frame for {timeout:.1f} s") from None
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def abandon(self) -> None:
        self._stop.set()
        while not self._queue.empty():  # unblock a pending put
            self._queue.get_nowait()


def decode_container(container: object, height: int, width: int
                     ) -> Iterator[tuple[np.ndarray, float, tuple[int, int]]]:
    """Yield (RGB frame resized to height x width, pts seconds, decoded (H, W)) from the first video
    stream."""
    stream = container.streams.video[0]  # type: ignore[attr-defined]
    stream.thread_type = "AUTO"
    tb = float(stream.time_base) if stream.time_base else 1.0 / 30
    rate = float(stream.average_rate) if stream.average_rate else 30.0
    n = 0
    for frame in container.decode(stream):  # type: ignore[attr-defined]
        pts = frame.pts * tb if frame.pts is not None else n / rate
        image = frame.to_ndarray(format="rgb24", width=width, height=height)
        yield image, float(pts), (frame.height, frame.width)
        n += 1


class FileIngest:
    """Frames of one video file; ``live`` is True when paced in real time (overload policy applies)."""

    def __init__(self, name: str, path: str | Path, height: int, width: int, *, loop: bool = False,
                 realtime: bool = False) -> None:
        self.name, self.path = name, Path(path)
        self.height, self.width = height, width
        self.loop, self.realtime = loop, realtime
        self.live = realtime

    def _frames(self) -> Iterator[IngestFrame]:
        import av

        offset = 0.0
        while True:
            try:
                container = av.open(str(self.path))
            except (av.error.FFmpegError, OSError) as exc:
                raise IngestError(f"source {self.name}: cannot open {self.path}: {exc}") from exc
            last = 0.0
            count = 0
            try:
                if not container.streams.video:
                    raise IngestError(f"source {self.name}: {self.path} has no video stream")
                frame_dt = 1.0 / float(container.streams.video[0].average_rate or 30)
                for image, pts, size in decode_container(container, self.height, self.width):
                    last = pts
                    count += 1
                    yield IngestFrame(image, offset + pts, time.monotonic(), size)
            except av.error.FFmpegError as exc:
                raise IngestError(f"source {self.name}: decode error in {self.path}: {exc}") from exc
            finally:
                container.close()
            if count == 0:
                raise IngestError(f"source {self.name}: {self.path} holds no decodable frame")
            if not self.loop:
                return
            offset += last + frame_dt

    async def frames(self) -> AsyncIterator[IngestFrame]:
        reader = ThreadedReader(self._frames, name=f"ingest-{self.name}")
        t0: float | None = None
        pts0 = 0.0
        try:
            while True:
                item = await reader.next_item()
                if item is None:
                    return
                assert isinstance(item, IngestFrame)
                if self.realtime:
                    if t0 is None:
                        t0, pts0 = time.monotonic(), item.pts
                    delay = t0 + (item.pts - pts0) - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    item.t_ingest = time.monotonic()
                yield item
        finally:
            reader.abandon()
