"""The watchdog's progress policy (daemon/progress.py, pure) and the /dev/shm room check (daemon/shm.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.progress import RESTARTING, STALL_MARGIN_S, STALLED, ProgressMonitor
from daemon.shm import ShmError, check_shm_room, ring_bytes


def test_stalled_only_when_windows_wait_past_the_deadline() -> None:
    m = ProgressMonitor(now=0.0)
    dl = 10.0
    assert m.reasons(1000.0, pending=False, restarting=False, deadline_s=dl) == []  # idle for long: fine
    assert m.reasons(1001.0, pending=True, restarting=False, deadline_s=dl) == []  # counts from now on
    assert m.reasons(1001.0 + dl + STALL_MARGIN_S - 0.1, pending=True, restarting=False, deadline_s=dl) == []
    assert m.reasons(1001.0 + dl + STALL_MARGIN_S + 0.1, pending=True, restarting=False,
                     deadline_s=dl) == [STALLED]
    m.progress(1020.0)  # a window completed
    assert m.reasons(1020.5, pending=True, restarting=False, deadline_s=dl) == []


def test_restart_in_progress_is_not_a_stall() -> None:
    m = ProgressMonitor(now=0.0)
    assert m.reasons(1.0, pending=True, restarting=False, deadline_s=5.0) == []
    assert m.reasons(30.0, pending=True, restarting=True, deadline_s=5.0) == [RESTARTING]
    # the deadline counts again from the end of the restart
    assert m.reasons(34.0, pending=True, restarting=False, deadline_s=5.0) == []
    assert m.reasons(36.5, pending=True, restarting=False, deadline_s=5.0) == [STALLED]


def test_shm_room_check_names_the_sizes(tmp_path: Path) -> None:
    need = ring_bytes(16, 384, 640)
    assert need > 16 * 384 * 640 * (3 + 12 + 1)  # frames, float32 priors, masks
    check_shm_room(1, tmp_path)
    with pytest.raises(ShmError, match=r"need [\d.]+ MiB in .* but only [\d.]+ MiB are free"):
        check_shm_room(1 << 62, tmp_path)
