"""RTSP ingest (PyAV over TCP) with reconnect and stall detection.

``av.open(url, options={"rtsp_transport": "tcp", "timeout": <us>}, timeout=(open, read))`` in a reader
thread; the async side waits for each frame at most ``stall_timeout_s`` and otherwise abandons the
connection and reopens. A server that dies mid-stream makes PyAV raise ``InvalidDataError`` (not a clean
EOF), so every ``av.error.FFmpegError`` leads to a reconnect with exponential backoff and full jitter,
reset after a frame arrives. A camera never "ends": an EOF also reconnects. A frame's pts is its wall-clock
(unix) receive time: camera timestamps restart with each session, and subscribers derive latency from it.
Credentials in the URL never
reach a log line (:func:`scrub_url`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator

from daemon.frames import IngestFrame
from daemon.redact import scrub
from daemon.stages.ingest_file import IngestError, StallError, ThreadedReader, decode_container

log = logging.getLogger(__name__)

scrub_url = scrub  # ``rtsp://user:pass@host/x`` -> ``rtsp://***:***@host/x`` anywhere in a string


def backoff_delays(initial: float, maximum: float, rng: random.Random | None = None) -> Iterator[float]:
    """Exponential backoff with full jitter: uniform(0.5, 1) x min(max, initial * 2**n)."""
    rng = rng or random.Random()
    n = 0
    while True:
        yield min(maximum, initial * (2**n)) * rng.uniform(0.5, 1.0)
        n += 1


class RtspIngest:
    live = True

    def __init__(self, name: str, url: str, height: int, width: int, *, open_timeout_s: float = 5.0,
                 stall_timeout_s: float = 5.0, reconnect_initial_s: float = 0.5,
                 reconnect_max_s: float = 10.0,
                 on_reconnect: Callable[[], None] | None = None, on_up: Callable[[bool], None] | None = None,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.name, self.url = name, url
        self.height, self.width = height, width
        self.open_timeout_s, self.stall_timeout_s = open_timeout_s, stall_timeout_s
        self.reconnect_initial_s, self.reconnect_max_s = reconnect_initial_s, reconnect_max_s
        self._on_reconnect = on_reconnect or (lambda: None)
        self._on_up = on_up or (lambda up: None)
        self._on_error = on_error or (lambda kind: None)
        self.reconnects = 0

    def _connection(self) -> Iterator[IngestFrame]:
        import av

        try:
            container = av.open(
                self.url,
                options={"rtsp_transport": "tcp", "timeout": str(int(self.open_timeout_s * 1e6))},
                timeout=(self.open_timeout_s, self.stall_timeout_s),
            )
        except (av.error.FFmpegError, OSError) as exc:
            raise IngestError(f"source {self.name}: cannot open {scrub_url(self.url)}: "
                              f"{scrub_url(str(exc))}") from exc
        try:
            for image, _ in decode_container(container, self.height, self.width):
                # a camera's pts restarts with every session: publish the wall-clock receive time instead
                # (monotonic across reconnects; subscribers read pts > 1e9 as a unix time -> latency)
                yield IngestFrame(image, time.time(), time.monotonic())
        except av.error.FFmpegError as exc:
            raise IngestError(f"source {self.name}: stream error: {scrub_url(str(exc))}") from exc
        finally:
            container.close()

    async def frames(self) -> AsyncIterator[IngestFrame]:
        delays = backoff_delays(self.reconnect_initial_s, self.reconnect_max_s)
        attempt = 0
        while True:
            if attempt:
                self.reconnects += 1
                self._on_reconnect()
            attempt += 1
            reader = ThreadedReader(self._connection, name=f"rtsp-{self.name}", maxsize=8)
            got_frame = False
            try:
                while True:
                    # the first frame may take open + a keyframe; later ones must come within the stall limit
                    timeout = self.stall_timeout_s + (0 if got_frame else self.open_timeout_s)
                    item = await reader.next_item(timeout)
                    if item is None:
                        raise IngestError(f"source {self.name}: stream ended")
                    assert isinstance(item, IngestFrame)
                    if not got_frame:
                        got_frame = True
                        delays = backoff_delays(self.reconnect_initial_s, self.reconnect_max_s)
                        self._on_up(True)
                        log.info("rtsp connected", extra={"source": self.name, "url": scrub_url(self.url)})
                    yield item
            except StallError as exc:
                self._on_error("stall")
                log.warning("rtsp stalled, reopening", extra={"source": self.name, "detail": str(exc)})
            except IngestError as exc:
                self._on_error("stream")
                log.warning("rtsp error, reopening", extra={"source": self.name, "detail": str(exc)})
            finally:
                reader.abandon()
            self._on_up(False)
            await asyncio.sleep(next(delays))
