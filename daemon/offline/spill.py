"""Source-size priors on disk while a clip is decoded (offline runs).

The clip-global prior statistics (spec 4.2 steps 2-3) are known only after the last frame, and the prior's
post-processing needs them before it can shrink a frame to the processing size; so the source-size priors
wait in a temporary file (plain writes and reads, no mapping: the page cache holds them, not this process's
memory) and are read back one frame at a time. 13 bytes per source pixel and frame (float32 xyz + mask).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


class PriorSpill:
    """Append-only frames of (points (H,W,3) float32, mask (H,W) bool); read back by index."""

    def __init__(self, height: int, width: int, folder: str | Path | None = None) -> None:
        self.height, self.width = height, width
        self._pts_bytes = height * width * 3 * 4
        self._frame_bytes = self._pts_bytes + height * width
        fd, name = tempfile.mkstemp(prefix="geometryd-spill-", suffix=".bin", dir=folder)
        os.unlink(name)  # gone with the descriptor, whatever ends the process
        self._fd = fd
        self.frames = 0

    def append(self, points: np.ndarray, mask: np.ndarray) -> None:
        """Frames (n,H,W,3) float32 and (n,H,W) bool, in order."""
        for p, m in zip(points, mask):
            if p.shape != (self.height, self.width, 3) or m.shape != (self.height, self.width):
                raise ValueError(f"prior frame {p.shape}/{m.shape} is not {self.height}x{self.width}")
            os.pwrite(self._fd, np.ascontiguousarray(p, np.float32).data, self.frames * self._frame_bytes)
            os.pwrite(self._fd, np.ascontiguousarray(m, bool).data,
                      self.frames * self._frame_bytes + self._pts_bytes)
            self.frames += 1

    def frame(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= i < self.frames:
            raise IndexError(f"prior frame {i} of {self.frames}")
        buf = bytearray(self._frame_bytes)
        view = memoryview(buf)
        got = 0
        while got < self._frame_bytes:
            n = os.preadv(self._fd, [view[got:]], i * self._frame_bytes + got)
            if n <= 0:
                raise OSError(f"prior spill file ended at frame {i}")
            got += n
        pts = np.frombuffer(buf, np.float32, self.height * self.width * 3).reshape(self.height, self.width, 3)
        mask = np.frombuffer(buf, bool, offset=self._pts_bytes).reshape(self.height, self.width)
        return pts, mask

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> PriorSpill:  # noqa: PYI034 - final class
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
