"""File sink: upstream-compatible ``.npz`` per window or per clip, optional 16-bit PNG depth per frame.

The npz matches GeometryCrafter's ``run.py`` output (spec 4.7 step 7: ``np.savez`` with ``point_map`` float16
(T,H,W,3) and ``mask`` bool (T,H,W), stored uncompressed) plus ``depth`` float32 (T,H,W), ``frame_index``
int64 (T,), ``window_id`` int64 (T,), ``pts`` float64 (T,) and ``intrinsics`` float32 (T,4) (fx, fy, cx, cy).
Layout: ``<dir>/<source>/window_<window_id:06d>.npz`` (``npz = "window"``: one file per pipeline window id,
written when the next window starts or at close) or ``<dir>/<source>/clip.npz`` (``npz = "clip"``, at
close); PNG: ``<dir>/<source>/depth/<frame_index:06d>.png`` (png16 encoding of ``daemon.wire.encoding``, its
``depth_quant_scale``/``depth_quant_offset`` in tEXt chunks).
Frames are appended to raw temp files as they arrive and the npz is assembled at the end, so memory stays at
one frame whatever the clip length. Every file is written to a temp name and renamed (atomic).
``write_frame`` blocks on disk I/O: call it from a worker thread in async code.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from daemon.config import FilesConfig
from daemon.wire import encoding

log = logging.getLogger(__name__)

_COPY_CHUNK = 8 << 20


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _NpzStream:
    """Arrays grown one frame at a time in raw temp files, assembled into an npz at ``finish``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", dir=path.parent))
        self.files: dict[str, BinaryIO] = {}
        self.meta: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        self.frames = 0

    def append(self, arrays: dict[str, np.ndarray | np.generic]) -> None:
        for name, value in arrays.items():
            value = np.asarray(value)  # (np.ascontiguousarray would turn a scalar into shape (1,))
            if not value.flags.c_contiguous:
                value = value.copy(order="C")
            if name not in self.files:
                self.files[name] = open(self.tmpdir / f"{name}.raw", "wb")  # noqa: SIM115 - closed in finish
                self.meta[name] = (value.dtype, value.shape)
            elif self.meta[name] != (value.dtype, value.shape):
                raise ValueError(f"{self.path.name}: {name} changed from {self.meta[name]} to "
                                 f"{(value.dtype, value.shape)} within one file")
            self.files[name].write(value.tobytes())
        self.frames += 1

    def finish(self) -> Path | None:
        """Write the npz (ZIP, stored, one ``<name>.npy`` member per array as np.savez does) and clean up."""
        try:
            for f in self.files.values():
                f.close()
            if self.frames == 0:
                return None
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                for name, (dtype, shape) in self.meta.items():
                    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                              "shape": (self.frames, *shape)}
                    with zf.open(f"{name}.npy", "w", force_zip64=True) as member, \
                            open(self.tmpdir / f"{name}.raw", "rb") as raw:
                        np.lib.format.write_array_header_2_0(member, header)
                        shutil.copyfileobj(raw, member, _COPY_CHUNK)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            return self.path
        finally:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


class FileSink:
    """Writes frames of every source under ``files_cfg.dir`` (``files_cfg``: a ``config.FilesConfig``)."""

    def __init__(self, files_cfg: FilesConfig) -> None:
        self.cfg = files_cfg
        self.root = Path(files_cfg.dir)
        self.mode = files_cfg.npz
        if self.mode not in ("off", "window", "clip"):
            raise ValueError(f"files.npz must be off, window or clip, got {self.mode!r}")
        self._streams: dict[str, tuple[int, _NpzStream]] = {}  # source -> (window id or -1, stream)
        self.written: list[Path] = []

    def _source_dir(self, source: str) -> Path:
        d = self.root / source
        d.mkdir(parents=True, exist_ok=True)
        return d

    def write_frame(self, source: str, result: Any, pts: float) -> None:
        """Append one ``FrameResult`` (duck-typed) to its npz and write its PNG depth if enabled."""
        directory = self._source_dir(source)
        if self.mode != "off":
            key = int(result.window_id) if self.mode == "window" else -1
            current = self._streams.get(source)
            if current is not None and current[0] != key:
                self._finish(source)
                current = None
            if current is None:
                name = f"window_{key:06d}.npz" if self.mode == "window" else "clip.npz"
                current = self._streams[source] = (key, _NpzStream(directory / name))
            current[1].append({
                "point_map": np.asarray(result.point_map, np.float16),
                "mask": np.asarray(result.mask, bool),
                "depth": np.asarray(result.depth, np.float32),
                "frame_index": np.int64(result.frame_index),
                "window_id": np.int64(result.window_id),
                "pts": np.float64(pts),
                "intrinsics": np.asarray(result.intrinsics, np.float32),
            })
        if self.cfg.png16_depth:
            self._write_png(directory, result)

    def _write_png(self, directory: Path, result: Any) -> None:
        q, props = encoding.quantize_depth(np.asarray(result.depth), np.asarray(result.mask, bool))
        text = {k: props[k] for k in ("depth_quant_scale", "depth_quant_offset")}
        text["frame_index"] = str(int(result.frame_index))
        png = encoding.png16_encode(q, level=6, text=text)
        (directory / "depth").mkdir(exist_ok=True)
        path = directory / "depth" / f"{int(result.frame_index):06d}.png"
        _atomic_write_bytes(path, png)
        self.written.append(path)

    def _finish(self, source: str) -> None:
        _, stream = self._streams.pop(source)
        path = stream.finish()
        if path is not None:
            self.written.append(path)
            log.info("files: wrote %s (%d frames)", path, stream.frames)

    def flush(self, source: str | None = None) -> None:
        """Finish the open npz of ``source`` (all sources when None), e.g. at the end of a file source."""
        for name in [source] if source is not None else list(self._streams):
            if name in self._streams:
                self._finish(name)

    def close(self) -> None:
        self.flush()
