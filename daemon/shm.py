"""FrameRing: one POSIX shared-memory segment per source holding frame slots and prior slots.

Design: ../shared/design/architecture.md ("Data flow"), measured facts in
../shared/notes/streaming-recipes.md ("Shared-memory ring").

Segment layout (all little-endian, offsets 64-byte aligned)::

    header   uint64[8]: magic, version, n_slots, height, width, owner_pid, generation_counter, reserved
    per slot uint64 seq[n]        seqlock: odd while the frame slot is being written
             uint64 gen[n]        generation of the frame currently in the slot (unique per write)
             int64  frame_index[n]
             float64 pts[n]
             uint64 prior_gen[n]  generation whose prior the prior slot holds (0 = none)
    frames   uint8   [n, H, W, 3]
    points   float32 [n, H, W, 3]   prior point map (written by the MoGe sidecar)
    mask     uint8   [n, H, W]      prior mask (0/1, exposed as bool)

The daemon creates the ring (one writer for frames); the sidecar attaches and writes prior slots of
the slots it is asked for. A slot is held from ``write_frame`` until ``release`` (once, by the owner);
how many windows share a slot (the overlap) is counted in one place, ``stages/window.py``'s
``WindowBuilder``, which hands back the refs whose last window is done. Readers (sidecar, geometry worker)
view a slot with ``frame(ref)`` and call ``verify(ref)`` after copying it: generations are unique per
write, so a slot rewritten during the copy fails the check. Only names and slot numbers cross process
boundaries, never pixels. A reader never registers the segment with Python's resource tracker (that
tracker would unlink the daemon's memory when the reader exits): it maps the segment through ``shm_open``
+ ``mmap`` itself.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

try:  # CPython's own binding (what SharedMemory uses); present on every POSIX CPython >= 3.8.
    import _posixshmem
except ImportError:  # pragma: no cover - non-CPython
    _posixshmem = None

log = logging.getLogger(__name__)

MAGIC = int.from_bytes(b"GEOMRING", "little")
VERSION = 2  # 2: the informational refcount array is gone (one count: stages/window.py)
PREFIX = "geometryd-"
SHM_DIR = Path("/dev/shm")
_HEADER_WORDS = 8
_SLOT_FIELDS = 5  # seq, gen, frame_index, pts, prior_gen
_ALIGN = 64
_NAME_RE = re.compile(r"^geometryd-(\d+)-([A-Za-z0-9_-]{1,32})$")
_SOURCE_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")

# Segments created by this process (a second create() of the same source is a bug, not staleness).
_created_here: set[str] = set()


class ShmError(Exception):
    """Root of shared-memory ring errors."""


class RingFullError(ShmError):
    """No free slot: every slot is still referenced by a reader."""


class StaleSlotError(ShmError):
    """The slot was rewritten (generation changed) or is being written."""


@dataclass(frozen=True)
class SlotRef:
    """Names one frame in a ring: the slot and the generation written there."""

    slot: int
    generation: int
    frame_index: int


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(frozen=True)
class _Layout:
    n_slots: int
    height: int
    width: int

    @property
    def meta_offset(self) -> int:
        return _HEADER_WORDS * 8

    @property
    def frames_offset(self) -> int:
        return _align(self.meta_offset + _SLOT_FIELDS * 8 * self.n_slots)

    @property
    def frame_bytes(self) -> int:
        return self.height * self.width * 3

    @property
    def points_offset(self) -> int:
        return _align(self.frames_offset + self.n_slots * self.frame_bytes)

    @property
    def mask_offset(self) -> int:
        return _align(self.points_offset + self.n_slots * self.frame_bytes * 4)

    @property
    def size(self) -> int:
        return _align(self.mask_offset + self.n_slots * self.height * self.width)


def ring_bytes(n_slots: int, height: int, width: int) -> int:
    """Size of one ring's segment (frames, priors, masks and slot metadata)."""
    return _Layout(n_slots, height, width).size


def check_shm_room(needed: int, shm_dir: Path = SHM_DIR) -> None:
    """Refuse to start when ``shm_dir`` cannot hold ``needed`` bytes: segments are sparse, so a full tmpfs
    would only show up later as SIGBUS on a frame write."""
    free = shutil.disk_usage(shm_dir).free
    if free < needed:
        raise ShmError(f"shared memory: the rings need {needed / 2**20:.1f} MiB in {shm_dir} but only "
                       f"{free / 2**20:.1f} MiB are free (enlarge it, e.g. docker --shm-size, or lower "
                       "geometry.height/width, window_size or daemon.shm_slack_frames)")


def segment_name(source: str, pid: int | None = None) -> str:
    """`geometryd-<pid>-<source>` (the pid is the owner's, so staleness can be decided from the name)."""
    if not _SOURCE_RE.match(source):
        raise ValueError(f"source name {source!r} must match [A-Za-z0-9_-]{{1,32}}")
    return f"{PREFIX}{os.getpid() if pid is None else pid}-{source}"


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _shm_unlink(name: str) -> None:
    if _posixshmem is not None:
        _posixshmem.shm_unlink("/" + name)
    else:  # pragma: no cover
        (SHM_DIR / name).unlink()


def cleanup_stale_segments(shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink every `geometryd-<pid>-*` segment whose owner pid is dead; returns the removed names."""
    removed: list[str] = []
    try:
        entries = sorted(p.name for p in shm_dir.iterdir())
    except FileNotFoundError:
        return removed
    for name in entries:
        m = _NAME_RE.match(name)
        if m is None or pid_alive(int(m.group(1))):
            continue
        try:
            _shm_unlink(name)
        except FileNotFoundError:
            continue
        removed.append(name)
        log.info("removed stale shared-memory segment", extra={"segment": name})
    return removed


class FrameRing:
    """Frame slots + prior slots of one source in one shared-memory segment (see module docstring).

    The creating side (daemon) allocates slots (`write_frame`) and frees them (`release`); both may be
    called from different threads. The attaching side (sidecar) reads frames and writes priors.
    """

    def __init__(self, name: str, buf: memoryview, layout: _Layout, *, owner: bool,
                 shm: shared_memory.SharedMemory | None, mm: mmap.mmap | None) -> None:
        self.name = name
        self.n_slots = layout.n_slots
        self.height = layout.height
        self.width = layout.width
        self._layout = layout
        self._owner = owner
        self._shm = shm
        self._mm = mm
        self._buf: memoryview | None = buf
        n, h, w = layout.n_slots, layout.height, layout.width
        self._header: np.ndarray = np.ndarray((_HEADER_WORDS,), np.uint64, buf, 0)
        meta = layout.meta_offset
        self._seq: np.ndarray = np.ndarray((n,), np.uint64, buf, meta)
        self._gen: np.ndarray = np.ndarray((n,), np.uint64, buf, meta + 8 * n)
        self._frame_index: np.ndarray = np.ndarray((n,), np.int64, buf, meta + 16 * n)
        self._pts: np.ndarray = np.ndarray((n,), np.float64, buf, meta + 24 * n)
        self._prior_gen: np.ndarray = np.ndarray((n,), np.uint64, buf, meta + 32 * n)
        self._frames: np.ndarray = np.ndarray((n, h, w, 3), np.uint8, buf, layout.frames_offset)
        self._points: np.ndarray = np.ndarray((n, h, w, 3), np.float32, buf, layout.points_offset)
        self._mask: np.ndarray = np.ndarray((n, h, w), np.bool_, buf, layout.mask_offset)
        self._lock = threading.Lock()
        self._free: deque[int] = deque(range(n))
        self._held = [False] * n  # owner side: written and not yet released
        self._next_gen = 1
        self._closed = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, source: str, n_slots: int, height: int, width: int) -> FrameRing:
        """Create `geometryd-<pid>-<source>` (daemon side); stale segments of dead pids are removed first."""
        if n_slots < 1 or height < 1 or width < 1:
            raise ValueError(f"ring geometry must be positive, got n_slots={n_slots} height={height} "
                             f"width={width}")
        cleanup_stale_segments()
        name = segment_name(source)
        if name in _created_here:
            raise ShmError(f"ring {name} already exists in this process")
        layout = _Layout(n_slots, height, width)
        try:
            shm = shared_memory.SharedMemory(name=name, create=True, size=layout.size)
        except FileExistsError:
            # Our own pid in a leftover name: a previous process with the same pid (pid reuse, containers).
            log.warning("replacing leftover segment with our pid", extra={"segment": name})
            _shm_unlink(name)
            shm = shared_memory.SharedMemory(name=name, create=True, size=layout.size)
        _created_here.add(name)
        buf = shm.buf
        assert buf is not None  # a new segment is mapped
        ring = cls(name, buf, layout, owner=True, shm=shm, mm=None)
        hdr = ring._header
        hdr[1:6] = (VERSION, n_slots, height, width, os.getpid())
        hdr[6] = 0
        ring._seq[:] = 0
        ring._gen[:] = 0
        ring._prior_gen[:] = 0
        hdr[0] = MAGIC  # last: a reader waits for it before trusting the geometry
        log.debug("created ring", extra={"segment": name, "slots": n_slots, "bytes": layout.size})
        return ring

    @classmethod
    def attach(cls, name: str, timeout: float = 5.0) -> FrameRing:
        """Map an existing ring (sidecar side). Waits up to `timeout` s for the segment and its magic.

        Never registers with the resource tracker, so this process exiting cannot unlink the segment.
        Raises FileNotFoundError if the segment does not appear in time.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                mm = _map_existing(name)
                if mm is not None:
                    hdr = np.frombuffer(mm, np.uint64, _HEADER_WORDS)
                    magic, version = int(hdr[0]), int(hdr[1])
                    n, h, w = int(hdr[2]), int(hdr[3]), int(hdr[4])
                    del hdr
                    if magic == MAGIC:
                        if version != VERSION:
                            mm.close()
                            raise ShmError(f"ring {name} has layout version {version}, expected {VERSION}")
                        layout = _Layout(n, h, w)
                        if len(mm) < layout.size:
                            mm.close()
                            raise ShmError(f"ring {name} is {len(mm)} bytes, its header needs {layout.size}")
                        return cls(name, memoryview(mm), layout, owner=False, shm=None, mm=mm)
                    mm.close()
            except FileNotFoundError:
                if time.monotonic() >= deadline:
                    raise
            if time.monotonic() >= deadline:
                raise FileNotFoundError(f"ring {name}: no initialised segment after {timeout} s")
            time.sleep(0.005)

    # ------------------------------------------------------------------ writer side (daemon)
    def write_frame(self, frame: np.ndarray, frame_index: int, pts: float) -> SlotRef:
        """Copy one (H,W,3) uint8 frame into a free slot; raises RingFullError when none is free."""
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise ValueError(f"frame must be ({self.height}, {self.width}, 3) uint8, "
                             f"got {frame.shape} {frame.dtype}")
        with self._lock:
            if not self._free:
                raise RingFullError(f"ring {self.name}: all {self.n_slots} slots are in use")
            slot = self._free.popleft()
            self._held[slot] = True
            gen = self._next_gen
            self._next_gen += 1
        self._seq[slot] += 1  # odd: being written
        self._gen[slot] = gen
        self._prior_gen[slot] = 0
        self._frames[slot] = frame
        self._frame_index[slot] = frame_index
        self._pts[slot] = pts
        self._header[6] = gen
        self._seq[slot] += 1  # even: stable
        return SlotRef(slot, gen, int(frame_index))

    def release(self, ref: SlotRef) -> None:
        """The slot may be reused (its last window is done). A stale or already released ref is ignored."""
        with self._lock:
            if int(self._gen[ref.slot]) != ref.generation or not self._held[ref.slot]:
                return
            self._held[ref.slot] = False
            self._free.append(ref.slot)

    def free_slots(self) -> int:
        with self._lock:
            return len(self._free)

    # ------------------------------------------------------------------ reader side
    def _check_slot(self, ref: SlotRef) -> None:
        if not 0 <= ref.slot < self.n_slots:
            raise IndexError(f"ring {self.name}: slot {ref.slot} out of range 0..{self.n_slots - 1}")
        if int(self._seq[ref.slot]) & 1 or int(self._gen[ref.slot]) != ref.generation:
            raise StaleSlotError(
                f"ring {self.name}: slot {ref.slot} holds generation {int(self._gen[ref.slot])}, "
                f"expected {ref.generation}")

    def frame(self, ref: SlotRef) -> np.ndarray:
        """Zero-copy (H,W,3) uint8 view. Call verify(ref) after using it: the slot could be rewritten."""
        self._check_slot(ref)
        return self._frames[ref.slot]

    def verify(self, ref: SlotRef) -> None:
        """Raise StaleSlotError if the slot no longer holds `ref` (seqlock check after a read)."""
        self._check_slot(ref)

    def frame_meta(self, ref: SlotRef) -> tuple[int, float]:
        """(frame_index, pts) stored with the frame."""
        self._check_slot(ref)
        return int(self._frame_index[ref.slot]), float(self._pts[ref.slot])

    def prior_points(self, ref: SlotRef) -> np.ndarray:
        """(H,W,3) float32 view of the prior point map slot."""
        self._check_slot(ref)
        return self._points[ref.slot]

    def prior_mask(self, ref: SlotRef) -> np.ndarray:
        """(H,W) bool view of the prior mask slot."""
        self._check_slot(ref)
        return self._mask[ref.slot]

    def mark_prior(self, ref: SlotRef) -> None:
        """Sidecar: the prior slot now holds the prior of `ref`'s frame."""
        self._check_slot(ref)
        self._prior_gen[ref.slot] = ref.generation

    def has_prior(self, ref: SlotRef) -> bool:
        """True if the prior slot holds the prior computed for `ref`'s frame."""
        return int(self._prior_gen[ref.slot]) == ref.generation and int(self._gen[ref.slot]) == ref.generation

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Unmap (views handed out earlier keep the mapping alive until they are garbage)."""
        if self._closed:
            return
        self._closed = True
        for attr in ("_header", "_seq", "_gen", "_frame_index", "_pts", "_prior_gen", "_frames", "_points",
                     "_mask"):
            setattr(self, attr, None)
        buf, self._buf = self._buf, None
        try:
            if self._shm is not None:
                del buf
                self._shm.close()
            elif self._mm is not None and buf is not None:
                buf.release()
                self._mm.close()
        except BufferError:
            log.debug("ring views still referenced; unmapping when they are released",
                      extra={"segment": self.name})

    def unlink(self) -> None:
        """Remove the segment name (owner only); mappings stay valid until closed."""
        if not self._owner:
            raise ShmError(f"ring {self.name}: only the creating process may unlink it")
        _created_here.discard(self.name)
        if self._shm is not None:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> FrameRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self._owner:
            self.unlink()

    def __repr__(self) -> str:
        return f"FrameRing({self.name!r}, n_slots={self.n_slots}, {self.height}x{self.width})"


def _map_existing(name: str) -> mmap.mmap | None:
    """mmap an existing segment read-write without the resource tracker; None while it is still empty."""
    if _posixshmem is not None:
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    else:  # pragma: no cover
        fd = os.open(SHM_DIR / name, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size < _HEADER_WORDS * 8:
            return None
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)
