"""`geometryd process` input path (issue #18): a resolution change mid-stream and a file without a video
stream end in one clear line (exit 2), decoding keeps one copy of the clip (peak RSS measured at
3840x2160), and the prior ring is sized by bytes for big frames."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from daemon.cli import main
from daemon.offline.process import prior_ring_slots
from daemon.video import VideoError, read_frames
from helpers.pipeline_fixtures import tiny_model_dir

REPO = Path(__file__).resolve().parents[2]


def _ts_clip(path: Path, n: int, h: int, w: int, value: int) -> bytes:
    with av.open(str(path), mode="w", format="mpegts") as c:
        st = c.add_stream("libx264", rate=Fraction(10))
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            img = np.full((h, w, 3), (value + 10 * i) % 256, np.uint8)
            for pkt in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)
    return path.read_bytes()


@pytest.fixture(scope="module")
def size_change_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("sizechange")
    joined = d / "joined.ts"  # MPEG-TS segments concatenate; the decoder meets a new SPS with a new size
    joined.write_bytes(_ts_clip(d / "a.ts", 4, 64, 128, 10) + _ts_clip(d / "b.ts", 4, 128, 192, 90))
    return joined


@pytest.fixture(scope="module")
def audio_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("audio") / "tone.wav"
    with av.open(str(path), mode="w") as c:
        st = c.add_stream("pcm_s16le", rate=8000)
        samples = (np.sin(np.arange(8000) / 8.0) * 3000).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 8000
        for pkt in st.encode(frame):
            c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)
    return path


def test_size_change_is_one_clear_error(size_change_clip: Path) -> None:
    with pytest.raises(VideoError, match=r"frame 4 is 192x128 but the video started at 128x64"):
        read_frames(size_change_clip)


def test_audio_only_is_one_clear_error(audio_only: Path) -> None:
    with pytest.raises(VideoError, match=r"has no video stream \(streams: audio\)"):
        read_frames(audio_only)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.getbasetemp())


@pytest.mark.parametrize("kind", ["size_change", "audio_only"])
def test_process_cli_exits_2_with_one_line(kind: str, request: pytest.FixtureRequest, tmp_path: Path,
                                           model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    video = request.getfixturevalue("size_change_clip" if kind == "size_change" else "audio_only")
    capsys.readouterr()
    rc = main(["process", str(video), "--model-dir", str(model), "--out", str(tmp_path / "o.npz"),
               "--height", "64", "--width", "128"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("geometryd process: error: "), err
    assert ("resolution change mid-stream" if kind == "size_change" else "has no video stream") in err[0]


# VmHWM, not ru_maxrss: a child started by a big parent inherits the parent's ru_maxrss across exec.
_RSS = """
import sys
from daemon.video import iter_frames, read_frames

def hwm():
    return next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))

for _ in iter_frames(sys.argv[1]):  # the decoder's own high-water mark (its frame pool, threads)
    pass
before = hwm()
frames, _ = read_frames(sys.argv[1])
print(frames.nbytes, hwm() - before)
"""


def test_decode_peak_is_one_copy_of_the_clip_at_4k(tmp_path: Path) -> None:
    path = tmp_path / "uhd.mp4"
    n, h, w = 8, 2160, 3840
    with av.open(str(path), mode="w") as c:
        st = c.add_stream("libx264", rate=Fraction(10))
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        st.options = {"preset": "ultrafast"}
        rng = np.random.default_rng(0)
        for _ in range(n):
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            for pkt in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(_RSS), str(path)], capture_output=True,
                         text=True, timeout=300, cwd=REPO, check=True)
    clip_bytes, grew = map(int, out.stdout.split())
    assert clip_bytes == n * h * w * 3
    print(f"clip {clip_bytes / 2**20:.0f} MiB, peak RSS grew {grew / 2**20:.0f} MiB beyond the decoder's own")
    assert grew < 1.3 * clip_bytes, (grew, clip_bytes)  # a list of frames + np.stack needed ~2x


def test_prior_ring_sized_by_bytes() -> None:
    assert prior_ring_slots(2160, 3840) == 4  # 133 MB slots in a 512 MB budget
    assert prior_ring_slots(384, 640) == 16
    assert prior_ring_slots(8192, 8192) == 1
