"""MCAP recording sink: ``<dir>/<source>/<start time>.mcap`` per source, Foxglove schemas
(daemon/wire/foxglove.py).

Each frame's messages (depth, colour, points, calibration, transform; log time = publish time = pts in ns) go
into ONE chunk that is compressed and written to the file as soon as the frame is complete (``Writer.flush``),
so a process killed mid-recording leaves a file that a streaming MCAP reader reads up to its last whole frame;
only the summary (indexes, statistics) at the end is missing, and it is written at ``close``. A new file
starts when the current one reaches ``rotate_mb`` MiB or spans ``rotate_s`` seconds of pts. File names are the
UTC wall time the file was opened, ``YYYYmmddTHHMMSS.ffffffZ.mcap``. ``write_frame`` blocks on compression and
disk I/O: call it from a worker thread in async code.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from mcap.writer import CompressionType, Writer

from daemon.wire import foxglove as fx

log = logging.getLogger(__name__)

LIBRARY = "geometryd"
_COMPRESSION = {"zstd": CompressionType.ZSTD, "lz4": CompressionType.LZ4, "none": CompressionType.NONE}
_CHUNK_BYTES = 1 << 30  # never finishes a chunk by size: write_frame finishes one per frame


def start_name(now: float | None = None) -> str:
    t = time.time() if now is None else now
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(t)) + f".{int((t % 1) * 1e6):06d}Z.mcap"


class McapFile:
    """One MCAP file being written: schemas and channels registered on first use, one chunk per frame."""

    def __init__(self, path: Path, compression: str = "zstd") -> None:
        if compression not in _COMPRESSION:
            raise ValueError(f"mcap compression must be zstd, lz4 or none, got {compression!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: BinaryIO = open(self.path, "xb")  # noqa: SIM115 - closed in close()
        self._w = Writer(self._f, chunk_size=_CHUNK_BYTES, compression=_COMPRESSION[compression])
        self._w.start(profile="", library=LIBRARY)
        self._schemas: dict[str, int] = {}
        self._channels: dict[str, int] = {}
        self._seq: dict[int, int] = {}
        self.frames = 0
        self.first_ns: int | None = None
        self.closed = False

    @property
    def size(self) -> int:
        return self._f.tell()

    def _channel(self, msg: fx.Message, metadata: dict[str, str]) -> int:
        cid = self._channels.get(msg.topic)
        if cid is None:
            schema = msg.schema.get_schema()
            sid = self._schemas.get(schema.name)
            if sid is None:
                sid = self._schemas[schema.name] = self._w.register_schema(schema.name, schema.encoding,
                                                                           schema.data)
            meta = metadata if msg.topic != "/tf" else {}
            cid = self._channels[msg.topic] = self._w.register_channel(msg.topic, schema.encoding, sid, meta)
        return cid

    def write(self, log_ns: int, messages: list[fx.Message], metadata: dict[str, str]) -> int:
        """Append one frame's messages as one chunk and push it to the OS; returns the bytes added."""
        before = self.size
        for msg in messages:
            cid = self._channel(msg, metadata)
            seq = self._seq.get(cid, 0)
            self._seq[cid] = seq + 1
            self._w.add_message(cid, log_time=log_ns, data=msg.message.encode(), publish_time=log_ns,
                                sequence=seq)
        self._w.flush()
        self.frames += 1
        if self.first_ns is None:
            self.first_ns = log_ns
        return self.size - before

    def close(self) -> None:
        """Write the summary (indexes, statistics) and footer, fsync, close."""
        if self.closed:
            return
        self.closed = True
        try:
            self._w.finish()
            self._f.flush()
            os.fsync(self._f.fileno())
        finally:
            self._f.close()


class McapRecorder:
    """The daemon's MCAP sink for every source (``mcap_cfg``: ``config.McapConfig``; ``files_dir`` is used
    when ``mcap_cfg.dir`` is empty). ``metrics`` (``daemon.metrics.Metrics``) counts frames, bytes, files."""

    name = "mcap"

    def __init__(self, mcap_cfg: Any, files_dir: str, metrics: Any = None) -> None:
        self.cfg = mcap_cfg
        self.root = Path(mcap_cfg.dir or files_dir)
        self.colour = bool(mcap_cfg.colour)
        self.metrics = metrics
        self._files: dict[str, McapFile] = {}
        self.written: list[Path] = []

    def _open(self, source: str) -> McapFile:
        directory = self.root / source
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / start_name()
        while path.exists():  # two files within one microsecond (rotation on a tiny rotate_mb)
            path = directory / start_name(time.time() + 1e-6)
        f = self._files[source] = McapFile(path, self.cfg.compression)
        self.written.append(path)
        if self.metrics is not None:
            self.metrics.sink_files.labels(self.name, source).inc()
        log.info("mcap: recording %s", path, extra={"source": source})
        return f

    def _due(self, f: McapFile, log_ns: int) -> bool:
        if self.cfg.rotate_mb and f.size >= self.cfg.rotate_mb * (1 << 20):
            return True
        return bool(self.cfg.rotate_s and f.first_ns is not None
                    and log_ns - f.first_ns >= self.cfg.rotate_s * 1e9)

    def write_frame(self, source: str, result: Any, pts: float, image: np.ndarray | None = None,
                    jpeg: bytes | None = None) -> None:
        """Record one ``FrameResult`` (duck-typed) of ``source``; ``image``/``jpeg``: its input frame."""
        try:
            log_ns, messages = fx.frame_messages(source, result, pts, stride=self.cfg.points_stride,
                                                 image=image if self.colour else None,
                                                 jpeg=jpeg if self.colour else None)
            f = self._files.get(source)
            if f is not None and self._due(f, log_ns):
                self._finish(source)
                f = None
            if f is None:
                f = self._open(source)
            n = f.write(log_ns, messages, fx.channel_metadata(result))
        except Exception:
            if self.metrics is not None:
                self.metrics.sink_fail(self.name, source)
            raise
        if self.metrics is not None:
            self.metrics.sink_wrote(self.name, source, n)

    def _finish(self, source: str) -> None:
        f = self._files.pop(source)
        f.close()
        log.info("mcap: wrote %s (%d frames)", f.path, f.frames, extra={"source": source})

    def flush(self, source: str | None = None) -> None:
        """Close the open file of ``source`` (all when None); the next frame opens a new one."""
        for name in [source] if source is not None else list(self._files):
            if name in self._files:
                self._finish(name)

    def close(self) -> None:
        self.flush()
