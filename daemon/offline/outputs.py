"""Output sinks of an offline run (daemon.offline.run.write_outputs): the upstream npz, written as frames
complete, the 16-bit PNG depth sequence, one PLY per frame and the MCAP recording.

The npz is what ``np.savez(path, point_map=float16, mask=bool)`` writes (an uncompressed zip of two .npy
members), but the point map member is streamed chunk by chunk through ``zipfile`` + ``np.lib.format``, so
only the mask (1 byte per output pixel) is held until the end. It is written under a temporary name and
renamed: an existing npz is always complete (resumable batches).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np

from daemon.config import McapConfig
from daemon.frames import FrameResult
from daemon.offline.ply import write_ply
from daemon.offline.run import OutputChunk
from daemon.video import iter_frames
from daemon.wire.encoding import png16_encode, quantize_depth


def _write_header(f: IO[bytes], dtype: np.dtype, shape: tuple[int, ...]) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    try:
        np.lib.format.write_array_header_1_0(f, header)
    except ValueError:  # header too long for format 1.0
        np.lib.format.write_array_header_2_0(f, header)


class NpzSink:
    """``point_map`` float16 (T,H,W,3) and ``mask`` bool (T,H,W), as run.py's np.savez."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}.tmp.npz")
        self._zip: zipfile.ZipFile | None = None
        self._member: IO[bytes] | None = None
        self._mask: np.ndarray | None = None
        self._next = 0

    def begin(self, frames: int, height: int, width: int, fps: float) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._zip = zipfile.ZipFile(self._tmp, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._member = self._zip.open("point_map.npy", "w", force_zip64=True)
        _write_header(self._member, np.dtype(np.float16), (frames, height, width, 3))
        self._mask = np.empty((frames, height, width), bool)

    def add(self, chunk: OutputChunk) -> None:
        assert self._member is not None and self._mask is not None
        if chunk.start != self._next:
            raise ValueError(f"npz: chunk at frame {chunk.start}, expected {self._next}")
        self._member.write(np.ascontiguousarray(chunk.point_map.astype(np.float16)).data)
        self._mask[chunk.start : chunk.start + len(chunk.mask)] = chunk.mask
        self._next += len(chunk.mask)

    def end(self) -> None:
        assert self._zip is not None and self._member is not None and self._mask is not None
        if self._next != len(self._mask):
            raise ValueError(f"npz: {self._next} of {len(self._mask)} frames written")
        self._member.close()
        with self._zip.open("mask.npy", "w", force_zip64=True) as m:
            _write_header(m, np.dtype(bool), self._mask.shape)
            m.write(self._mask.data)
        self._zip.close()
        self._zip = self._member = None
        self._mask = None
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        try:
            if self._member is not None:
                self._member.close()
            if self._zip is not None:
                self._zip.close()
        finally:
            self._zip = self._member = None
            self._mask = None
            self._tmp.unlink(missing_ok=True)


class PngDepthSink:
    """One ``depth_<i:06d>.png`` per frame: png16 of daemon.wire.encoding (inverse depth, tEXt
    scale/offset)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.paths: list[Path] = []

    def begin(self, frames: int, height: int, width: int, fps: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def add(self, chunk: OutputChunk) -> None:
        for k in range(len(chunk.depth)):
            q, props = quantize_depth(chunk.depth[k], chunk.mask[k])
            p = self.folder / f"depth_{chunk.start + k:06d}.png"
            p.write_bytes(png16_encode(q, text=props))
            self.paths.append(p)

    def end(self) -> None:
        pass

    def abort(self) -> None:
        pass


class SourceColours:
    """The decoded input frames (output size = source size) in order, decoded again as the chunks arrive:
    the colour of the PLY points and of the MCAP colour channel without holding the clip."""

    def __init__(self, video: Path, stride: int, max_frames: int) -> None:
        self._frames = iter_frames(video, stride=stride, max_frames=max_frames)
        self._next = 0

    def take(self, start: int, n: int) -> list[np.ndarray]:
        if start != self._next:
            raise ValueError(f"colours: chunk at frame {start}, expected {self._next}")
        out = [next(self._frames) for _ in range(n)]
        self._next += n
        return out

    def close(self) -> None:
        close = getattr(self._frames, "close", None)
        if close is not None:
            close()


class PlySink:
    """One ``points_<i:06d>.ply`` per frame (daemon.offline.ply): xyz float32 + rgb of the input frame."""

    def __init__(self, folder: Path, colours: SourceColours) -> None:
        self.folder, self.colours = Path(folder), colours
        self.paths: list[Path] = []

    def begin(self, frames: int, height: int, width: int, fps: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def add(self, chunk: OutputChunk) -> None:
        rgb = self.colours.take(chunk.start, len(chunk.mask))
        for k in range(len(chunk.mask)):
            i = chunk.start + k
            p = self.folder / f"points_{i:06d}.ply"
            write_ply(p, chunk.point_map[k], rgb[k], chunk.mask[k], comment=f"geometryd frame {i}")
            self.paths.append(p)

    def end(self) -> None:
        self.colours.close()

    def abort(self) -> None:
        self.colours.close()


class McapSink:
    """The daemon's MCAP channels (daemon/stages/publish_mcap.py, ``[mcap]`` defaults) for a whole clip; frame
    i at pts ``i * stride / fps``. Written under a temporary name and renamed."""

    def __init__(self, path: Path, source: str, stride: int, colours: SourceColours | None) -> None:
        self.path, self.source, self.stride, self.colours = Path(path), source, stride, colours
        self.cfg = McapConfig()
        self._tmp = self.path.with_name(f".{self.path.name}.tmp")
        self._file: Any = None  # daemon.stages.publish_mcap.McapFile
        self._fps = 0.0

    def begin(self, frames: int, height: int, width: int, fps: float) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        from daemon.stages.publish_mcap import McapFile  # heavy: mcap, foxglove

        self._tmp.unlink(missing_ok=True)
        self._file = McapFile(self._tmp, self.cfg.compression)
        self._fps = fps

    def add(self, chunk: OutputChunk) -> None:
        from daemon.wire import foxglove as fx  # heavy: foxglove

        assert self._file is not None
        n = len(chunk.mask)
        rgb = (self.colours.take(chunk.start, n) if self.colours is not None and self.cfg.colour
               else [None] * n)
        for k in range(n):
            i = chunk.start + k
            intr = tuple(float(v) for v in chunk.intrinsics[k])
            res = FrameResult(i, 0, chunk.point_map[k], chunk.depth[k], chunk.mask[k],
                              (intr[0], intr[1], intr[2], intr[3]))
            pts = i * self.stride / self._fps if self._fps else float(i)
            log_ns, messages = fx.frame_messages(self.source, res, pts, stride=self.cfg.points_stride,
                                                 image=rgb[k])
            self._file.write(log_ns, messages, fx.channel_metadata(res))

    def end(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        os.replace(self._tmp, self.path)
        if self.colours is not None:
            self.colours.close()

    def abort(self) -> None:
        try:
            if self._file is not None:
                self._file.close()
        finally:
            self._file = None
            self._tmp.unlink(missing_ok=True)
            if self.colours is not None:
                self.colours.close()
