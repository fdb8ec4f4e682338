"""`geometryd demo` (the README's first command) end to end, small: it must exit 0, print per-frame lines
received over MQTT, write the previews and say that the weights are random."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers.run_daemon import (
    REPO,
    tiny_model,  # noqa: F401 (fixture)
)

pytestmark = pytest.mark.e2e


def test_demo_runs_end_to_end(tiny_model: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "demo", "--workdir", str(tmp_path / "demo"), "--model-dir", str(tiny_model),
         "--frames", "14", "--window", "8", "--overlap", "2", "--steps", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    frame_lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("frame ")]
    assert len(frame_lines) == 14, out[-3000:]
    assert "valid" in frame_lines[0] and "mqtt latency" in frame_lines[0]
    assert "RANDOM weights" in proc.stdout and "geometryd weights pull" in proc.stdout
    assert (tmp_path / "demo" / "depth_preview.png").stat().st_size > 1000
    assert (tmp_path / "demo" / "depth_preview.mp4").stat().st_size > 1000
    assert "frames in 14, published 14, skipped 0, dropped 0; received over MQTT: 14" in proc.stdout


@pytest.mark.timeout(2400)  # builds the tiny model, then the whole demo
def test_demo_from_an_empty_work_dir_exits_0(tmp_path: Path) -> None:
    """The README's first command on a fresh checkout: no var/, no tiny model yet (built on the way)."""
    import os

    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("GEOMETRYD_TEST_TINY_MODEL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "demo", "--frames", "14", "--window", "8", "--overlap", "2", "--steps", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Caught SIGCHLD" not in out and "quick exit" not in out, out[-4000:]
    assert (tmp_path / "var" / "tiny-model" / "unet_diff").is_dir()
    assert "frames in 14, published 14, skipped 0, dropped 0" in proc.stdout, out[-3000:]
