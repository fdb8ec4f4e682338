"""Sliding windows over a source's frames, and the overload policy that admits frames into them.

Windows follow the pipeline contract (``StreamingSession.push_window``, daemon/pipeline.py): the first
window is ``window_size`` new frames; each later one is the last ``overlap`` frames of the previous window
followed by ``stride = window_size - overlap`` new frames. A slot is referenced by every window that
contains it and released to the ring when the last of those windows is done (overlap slots live through
two windows).

Overload (architecture.md "Streaming semantics"): at most ``bound`` complete windows may wait for the
geometry stage (``skip``: 1, so the prior of window N+1 overlaps geometry of window N; ``queue``:
``max_queued_windows``). For a live source a frame that would complete a window beyond that bound is not
admitted (``skip`` counts it skipped, ``queue`` counts it dropped). ``skip`` additionally thins frames
before they enter a window, keeping the fraction ``capacity_fps / input_fps`` measured online, evenly
spaced in SOURCE time: an admitted frame sets the next admission time ``pts + 1 / (keep * source_fps)``
(``source_fps`` from pts deltas), so a source with jittery arrival or a variable frame rate still gives
windows of evenly spaced frames. Each window's effective frame rate (``window_fps``) is recorded. The ring
therefore needs at most
``window_size + (bound + 1) * stride`` slots (:func:`ring_slots`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from daemon.frames import FrameMeta


@dataclass
class Window:
    window_id: int
    refs: list[Any]  # daemon.shm.SlotRef, oldest first
    metas: list[FrameMeta]
    n_new: int  # the last n_new frames are new; the first len(refs) - n_new were carried over
    final: bool = False
    prior_ok: bool = True  # set by the prior stage
    prior_s: float = 0.0  # seconds the prior stage spent on this window

    @property
    def new_refs(self) -> list[Any]:
        return self.refs[len(self.refs) - self.n_new:]

    @property
    def new_metas(self) -> list[FrameMeta]:
        return self.metas[len(self.metas) - self.n_new:]

    @property
    def first_seq(self) -> int:
        return self.metas[0].seq

    @property
    def fps(self) -> float:
        """Effective source frame rate of the window: frames per second of pts (0 when unknown)."""
        span = self.metas[-1].pts - self.metas[0].pts
        return (len(self.metas) - 1) / span if len(self.metas) > 1 and span > 0 else 0.0

    def __len__(self) -> int:
        return len(self.refs)


def ring_slots(window_size: int, overlap: int, bound: int, slack: int) -> int:
    """Slots one source's ring needs so that admitted frames never find it full (see module docstring)."""
    return window_size + (bound + 1) * (window_size - overlap) + slack


class WindowBuilder:
    def __init__(self, window_size: int, overlap: int) -> None:
        if not 0 <= overlap < window_size:
            raise ValueError(f"overlap must be in [0, window_size), got {overlap} for window {window_size}")
        self.window_size, self.overlap = window_size, overlap
        self.stride = window_size - overlap
        self._carry: list[tuple[Any, FrameMeta]] = []
        self._new: list[tuple[Any, FrameMeta]] = []
        self._refcount: dict[tuple[int, int], int] = {}
        self._next_id = 0

    @property
    def needed(self) -> int:
        """New frames still missing before the window being filled is complete."""
        target = self.window_size if self._next_id == 0 else self.stride
        return target - len(self._new)

    @property
    def filling_id(self) -> int:
        """Id of the window the next added frame enters as a new frame."""
        return self._next_id

    @property
    def held(self) -> int:
        return len(self._new)

    def add(self, ref: Any, meta: FrameMeta) -> Window | None:
        self._refcount[(ref.slot, ref.generation)] = 1
        self._new.append((ref, meta))
        return self._emit(final=False) if self.needed == 0 else None

    def finish(self) -> Window | None:
        """End of stream: a last, shorter window holding the carried frames and the pending new ones."""
        if not self._new:
            return None
        return self._emit(final=True)

    def _emit(self, final: bool) -> Window:
        items = self._carry + self._new
        win = Window(self._next_id, [r for r, _ in items], [m for _, m in items], len(self._new), final)
        self._next_id += 1
        self._carry = items[len(items) - self.overlap:] if self.overlap and not final else []
        for ref, _ in self._carry:
            self._refcount[(ref.slot, ref.generation)] += 1
        self._new = []
        return win

    def done(self, window: Window) -> list[Any]:
        """A window is finished (processed or abandoned): the slot refs whose last user it was."""
        free = []
        for ref in window.refs:
            key = (ref.slot, ref.generation)
            self._refcount[key] -= 1
            if self._refcount[key] == 0:
                del self._refcount[key]
                free.append(ref)
        return free

    def abandon_pending(self) -> list[tuple[Any, FrameMeta]]:
        """Drop the frames still being collected (shutdown without a final window); returns them."""
        pending = self._new
        self._new = []
        for ref, _ in pending:
            self._refcount.pop((ref.slot, ref.generation), None)
        return pending

    def release_carry(self) -> list[Any]:
        """After the final window: the carried slots no window will use any more."""
        free = []
        for ref, _ in self._carry:
            key = (ref.slot, ref.generation)
            self._refcount[key] -= 1
            if self._refcount[key] == 0:
                del self._refcount[key]
                free.append(ref)
        self._carry = []
        return free


class Verdict(Enum):
    ADMIT = "admit"
    SKIP = "skip"
    DROP = "drop"


@dataclass
class Admission:
    """Decides, per arriving frame of a live source, whether it enters a window."""

    policy: str  # "skip" | "queue"
    max_queued_windows: int = 2
    alpha: float = 0.2  # EMA weight of the rate estimates
    input_fps: float | None = None
    capacity_fps: float | None = None
    source_fps: float | None = None  # from pts deltas
    _credit: float = 1.0
    _last_arrival: float | None = field(default=None, repr=False)
    _last_pts: float | None = field(default=None, repr=False)
    _next_pts: float | None = field(default=None, repr=False)

    @property
    def bound(self) -> int:
        return 1 if self.policy == "skip" else max(1, self.max_queued_windows)

    def note_arrival(self, t: float, pts: float | None = None) -> None:
        if self._last_arrival is not None and t > self._last_arrival:
            self.input_fps = self._ema(self.input_fps, 1.0 / (t - self._last_arrival))
        self._last_arrival = t
        if pts is not None:
            if self._last_pts is not None and pts > self._last_pts:
                self.source_fps = self._ema(self.source_fps, 1.0 / (pts - self._last_pts))
            self._last_pts = pts

    def note_window(self, n_new: int, seconds: float, window_id: int = 1) -> None:
        """Geometry (+prior) finished a window with n_new new frames in ``seconds`` of compute."""
        if window_id == 0:
            return  # a cold first window (ring attach, allocator warm-up) would under-estimate capacity
        if seconds > 0 and n_new > 0:
            self.capacity_fps = self._ema(self.capacity_fps, n_new / seconds)

    def keep_fraction(self) -> float:
        if self.policy != "skip" or not self.input_fps or not self.capacity_fps:
            return 1.0
        return min(1.0, self.capacity_fps / self.input_fps)

    def decide(self, completes_window: bool, waiting_windows: int, pts: float | None = None) -> Verdict:
        if completes_window and waiting_windows >= self.bound:
            return Verdict.SKIP if self.policy == "skip" else Verdict.DROP
        if self.policy == "skip" and pts is not None and self.source_fps:
            return self._decide_by_pts(pts, self.source_fps)
        if self.policy == "skip":
            self._credit = min(1.0, self._credit + self.keep_fraction())
            if self._credit < 1.0 - 1e-9:
                return Verdict.SKIP
            self._credit -= 1.0
        return Verdict.ADMIT

    def _decide_by_pts(self, pts: float, source_fps: float) -> Verdict:
        keep = self.keep_fraction()
        if keep >= 1.0:
            self._next_pts = None
            return Verdict.ADMIT
        step = 1.0 / (keep * source_fps)  # source seconds between admitted frames
        if self._next_pts is not None and pts < self._next_pts - 0.5 / source_fps:
            return Verdict.SKIP
        on_grid = self._next_pts is not None and pts - self._next_pts <= step
        self._next_pts = (self._next_pts + step) if on_grid else pts + step  # type: ignore[operator]
        return Verdict.ADMIT

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new
