"""Is the pipeline making progress? The watchdog's and /healthz's view of the geometry stage (pure, no I/O).

Progress = a window completed. The pipeline is *stalled* when windows wait for geometry (queued or in the
worker) and none completed for longer than the window deadline plus a second; the daemon then stops its
``WATCHDOG=1`` pings (systemd's ``WatchdogSec`` restarts the unit) and /healthz reports
``degraded: pipeline_stalled``. While the geometry worker is being restarted after a fault the clock is held
(``geometry_restarting``: recovery in progress, bounded by ``geometry.restart_timeout_s``), so an in-place
restart that takes longer than ``WatchdogSec`` does not get the whole unit restarted.
"""

from __future__ import annotations

STALLED = "pipeline_stalled"
RESTARTING = "geometry_restarting"
STALL_MARGIN_S = 1.0  # the worker's own deadline fires first; the watchdog is the backstop


class ProgressMonitor:
    def __init__(self, now: float) -> None:
        self.last_progress = now
        self._pending_since: float | None = None

    def progress(self, now: float) -> None:
        """A window completed."""
        self.last_progress = now

    def reasons(self, now: float, *, pending: bool, restarting: bool, deadline_s: float) -> list[str]:
        """Degraded reasons now (empty: healthy). ``pending``: windows wait for or are in geometry."""
        if not pending:
            self._pending_since = None
        elif self._pending_since is None:
            self._pending_since = now  # idle until now: the deadline counts from the first waiting window
        if restarting:
            self.last_progress = now
            return [RESTARTING]
        if pending and now - max(self.last_progress,
                                 self._pending_since or now) > deadline_s + STALL_MARGIN_S:
            return [STALLED]
        return []
