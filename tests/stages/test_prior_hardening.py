"""Prior retries that retry, and no sidecar folder left behind (issue #18), with real sidecar processes:
a sidecar killed again while it restarts costs one attempt, not all of them; the folders of a SIGKILLed
daemon's sidecar are removed at the next startup."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from daemon.config import PriorConfig
from daemon.shm import FrameRing
from daemon.stages.prior import PriorSidecar, SidecarBudgetExhausted, cleanup_stale_prior_dirs

ROOT = Path(__file__).resolve().parents[2]
H, W = 64, 96


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moge_sidecar.tiny import make_tiny_moge

    path = tmp_path_factory.mktemp("moge") / "model.pt"
    make_tiny_moge(path, seed=0)
    return path


def _frames(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, H, W, 3), dtype=np.uint8)


def test_sidecar_killed_while_restarting_costs_one_attempt(checkpoint: Path) -> None:
    settings = PriorConfig(device="cpu", request_timeout_s=60.0, startup_timeout_s=60.0, restart_budget=10)

    async def go() -> tuple[dict, int]:
        sc = PriorSidecar(settings, checkpoint, chunk=4, threads=1, backoff_initial_s=0.1)
        await sc.start()
        ring = FrameRing.create("retry", 6, H, W)
        try:
            refs = [ring.write_frame(f, i, i / 30) for i, f in enumerate(_frames(6))]
            first = sc.pid
            task = asyncio.create_task(sc.compute(ring, refs))
            for _ in range(2000):  # wait until the sidecar works on this request
                if (await sc.ping())["busy_s"] > 0:
                    break
                await asyncio.sleep(0.005)
            os.kill(first, signal.SIGKILL)
            for _ in range(2000):  # the replacement is spawned: kill it while it loads the model
                if sc.pid != first:
                    break
                await asyncio.sleep(0.005)
            assert sc.pid != first and not sc.connected
            os.kill(sc.pid, signal.SIGKILL)
            timing = await asyncio.wait_for(task, 120)
            assert all(ring.has_prior(r) for r in refs)
            return timing, sc.restarts
        finally:
            ring.close()
            ring.unlink()
            await sc.stop()

    timing, restarts = asyncio.run(go())
    assert timing["attempts"] == 3 and restarts == 2  # attempt 1: crash; 2: its restart killed; 3: restarted


def test_budget_exhausted_is_its_own_error_and_says_when(checkpoint: Path) -> None:
    settings = PriorConfig(device="cpu", request_timeout_s=60.0, startup_timeout_s=60.0, restart_budget=1)

    async def go() -> float:
        sc = PriorSidecar(settings, checkpoint, chunk=4, threads=1, backoff_initial_s=0.1)
        await sc.start()
        ring = FrameRing.create("budget1", 2, H, W)
        try:
            refs = [ring.write_frame(f, i, i / 30) for i, f in enumerate(_frames(2))]
            assert sc.budget_wait_s() == 0.0
            os.kill(sc.pid, signal.SIGKILL)
            await sc.compute(ring, refs)  # uses the one restart
            os.kill(sc.pid, signal.SIGKILL)
            with pytest.raises(SidecarBudgetExhausted):
                await sc.compute(ring, refs)
            return sc.budget_wait_s()
        finally:
            ring.close()
            ring.unlink()
            await sc.stop()

    wait = asyncio.run(go())
    assert 30.0 < wait <= 60.0


_CHILD = """
import asyncio, sys
from pathlib import Path
from daemon.config import PriorConfig
from daemon.stages.prior import PriorSidecar

async def main():
    sc = PriorSidecar(PriorConfig(device="cpu", startup_timeout_s=60.0), Path(sys.argv[1]), threads=1)
    await sc.start()
    print(sc._tmpdir, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_stale_prior_folders_removed(checkpoint: Path, tmp_path: Path) -> None:
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_CHILD), str(checkpoint)], cwd=ROOT,
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        folder = Path(p.stdout.readline().strip())
        assert folder.is_dir() and (folder / "moge.sock").exists()
        assert folder.name not in cleanup_stale_prior_dirs()  # its daemon is alive: kept
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # systemd's final kill of the cgroup
        p.wait(10)
    # a 0.1.0-style folder (no pid in the name) whose socket nobody listens on any more
    legacy = Path(tempfile.mkdtemp(prefix="geometryd-prior-"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(legacy / "moge.sock"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and folder.exists() and not cleanup_stale_prior_dirs():
        time.sleep(0.1)
    removed = cleanup_stale_prior_dirs()  # idempotent; the first call above may have done the work
    assert not folder.exists() and not legacy.exists(), removed
