"""`geometryd demo` (the README's first command) end to end, small: it must exit 0, print per-frame lines
received over MQTT, write the previews and say that the weights are random."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from daemon_fixtures import REPO, tiny_model  # noqa: F401 (fixture)


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
