"""MoGe sidecar (moge_sidecar/, daemon/stages/prior.py): two real processes over real shared memory.

- priors equal the same MoGe model called in-process with the same inference function (<= 1e-5 abs),
  and no frame bytes cross the socket;
- kill -9 of the sidecar during a request, and a hung (SIGSTOPped) sidecar: restarted, request completes;
- kill -9 of the daemon side: the sidecar exits within 2 s; SIGKILL of everything + restart leaves no stale
  segment in /dev/shm;
- malformed request, unknown ring, out-of-range slot, changed generation: clear error reply, sidecar stays up.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from msgspec.structs import replace

from daemon.config import PriorConfig
from daemon.shm import FrameRing, SlotRef, cleanup_stale_segments
from daemon.stages.prior import (
    PriorError,
    PriorRequestError,
    PriorSidecar,
    SidecarUnavailable,
    run_priors,
)

ROOT = Path(__file__).resolve().parents[2]
H, W = 64, 96
CHUNK = 4
TOL = 1e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from moge_sidecar.tiny import make_tiny_moge

    path = tmp_path_factory.mktemp("moge") / "model.pt"
    make_tiny_moge(path, seed=0)
    return path


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (1, H, W, 3), dtype=np.uint8)
    drift = rng.integers(-20, 21, (12, 1, 1, 3))
    return np.clip(base.astype(int) + drift, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def prior(checkpoint: Path):
    from moge_sidecar.infer import load_moge

    return load_moge(checkpoint, "cpu")


@pytest.fixture(scope="module")
def reference(prior, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """In-process MoGe on the same frames, same inference function, same chunking as the sidecar."""
    import torch

    from moge_sidecar.infer import frames_to_image

    pts, masks = [], []
    for i in range(0, len(frames), CHUNK):
        p, m = prior(frames_to_image(torch.from_numpy(frames[i:i + CHUNK])))
        pts.append(p.numpy())
        masks.append(m.numpy())
    return np.concatenate(pts), np.concatenate(masks)


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def sidecar(loop, checkpoint):
    """One supervised sidecar shared by the request tests (the fault tests restart it in place)."""
    sc = PriorSidecar(_settings(), checkpoint, chunk=CHUNK, threads=1, backoff_initial_s=0.1)
    loop.run_until_complete(sc.start())
    assert sc.connected
    yield sc
    pid = sc.pid
    loop.run_until_complete(sc.stop())
    assert not _alive(pid), "stop() ends the sidecar"


@pytest.mark.filterwarnings("ignore:In CPU autocast")
def test_pinned_inference_matches_dlr_moge_where_the_orders_agree(prior) -> None:
    """At the model's own resolution no resize happens, so the pinned order (spec 4.2) and dlr-moge's
    `v1.MoGeModel.infer(use_fp16=False, apply_mask=False)` must agree: this checks our re-assembled forward
    (normalise, /14 resize, backbone, head, remap) and focal/shift/re-projection against the library."""
    import torch

    side = int(prior.area_range[1] ** 0.5)
    assert side * side == prior.area_range[1]  # tiny config: 84 x 84 = max trained area
    image = torch.rand((2, 3, side, side), generator=torch.Generator().manual_seed(3))
    points, mask = prior(image)
    lib = prior.model.infer(image, resolution_level=9, apply_mask=False, force_projection=True, use_fp16=False)
    assert mask.dtype == torch.bool and 0 < mask.float().mean() < 1
    assert torch.equal(mask, lib["mask"])
    assert (points - lib["points"]).abs().max() <= 1e-5 * max(1.0, float(lib["points"].abs().max()))


def _pinned_infer_reference(prior, image, focal_shift=None):
    """The pinned `MoGeModel.infer(image, resolution_level=9, apply_mask=False)` (MoGe dd158c0,
    moge/model/moge_model.py), transcribed statement by statement after the forward (whose re-assembly the
    test above checks against dlr-moge): intrinsics from the ORIGINAL aspect ratio, re-projection on the
    resized grid (utils3d `image_uv` pixel centres + `unproject_cv`), bilinear resize back."""
    import torch
    import torch.nn.functional as F
    from moge.utils.geometry_torch import recover_focal_shift

    from moge_sidecar.infer import _forward_v1

    original_height, original_width = image.shape[-2:]
    area = original_height * original_width
    aspect_ratio = original_width / original_height
    min_area, max_area = prior.area_range
    expected_area = min_area + (max_area - min_area) * (9 / 9)
    assert expected_area != area  # the resize path (the pinned code needs it: expected_width)
    expected_width = int(original_width * (expected_area / area) ** 0.5)
    expected_height = int(original_height * (expected_area / area) ** 0.5)
    image = F.interpolate(image, (expected_height, expected_width), mode="bicubic", align_corners=False,
                          antialias=True)
    points, mask = _forward_v1(prior.model, image)
    focal, shift = recover_focal_shift(points, mask > 0.5) if focal_shift is None else focal_shift
    fx = focal / 2 * (1 + aspect_ratio ** 2) ** 0.5 / aspect_ratio
    fy = focal / 2 * (1 + aspect_ratio ** 2) ** 0.5
    depth = points[..., 2] + shift[..., None, None]
    u = (torch.arange(expected_width, dtype=torch.float32) + 0.5) / expected_width
    v = (torch.arange(expected_height, dtype=torch.float32) + 0.5) / expected_height
    x = (u[None, None, :] - 0.5) / fx[:, None, None] * depth
    y = (v[None, :, None] - 0.5) / fy[:, None, None] * depth
    points = torch.stack([x, y, depth], dim=-1)
    points = F.interpolate(points.permute(0, 3, 1, 2), (original_height, original_width), mode="bilinear",
                           align_corners=False, antialias=False).permute(0, 2, 3, 1)
    mask = F.interpolate(mask.unsqueeze(1), (original_height, original_width), mode="bilinear",
                         align_corners=False, antialias=False).squeeze(1)
    return points, mask > 0.5, (expected_height, expected_width)


@pytest.mark.filterwarnings("ignore:In CPU autocast")
def test_pinned_inference_on_the_resize_path_follows_the_pinned_code(prior) -> None:
    """5:3 input (60x100): resized to 65x108, whose aspect ratio (1.6615) is not the input's (1.6667). The
    pinned code builds fx/fy from the input's; the resized size's would move them by ~8e-4 relative."""
    import torch

    image = torch.rand((2, 3, 60, 100), generator=torch.Generator().manual_seed(4))
    got, got_mask = prior(image)
    want, want_mask, (h, w) = _pinned_infer_reference(prior, image)
    assert (h, w) == (65, 108)
    assert got.shape == want.shape == (2, 60, 100, 3)
    assert torch.equal(got_mask, want_mask) and 0 < got_mask.float().mean() < 1
    scale = float(want.abs().max())
    err = float((got - want).abs().max()) / scale
    assert err <= 4e-7, err  # measured 1.4e-7 (old code, resized aspect ratio: 1.08e-3)
    # the tolerance is far below the effect of using the resized aspect ratio instead
    r, rw = 100 / 60, w / h
    wrong_x = want[..., 0] * (rw / r) * ((1 + r ** 2) / (1 + rw ** 2)) ** 0.5  # x = (u - 0.5) / fx * depth
    assert float((wrong_x - want[..., 0]).abs().max()) / scale > 100 * 4e-7


@pytest.mark.filterwarnings("ignore:In CPU autocast")
def test_frames_without_valid_points_get_focal_1_shift_0(checkpoint) -> None:
    """MoGe guard (dlr-moge's recover_focal_shift, kept; docs/parity.md): a frame whose low-resolution mask
    has fewer than 2 valid points gets focal 1 and shift 0 instead of the least-squares solve, which the
    pinned code would call (and scipy rejects with no points). The mask head's bias forces an empty mask."""
    import torch

    from moge_sidecar.infer import load_moge

    prior = load_moge(checkpoint, "cpu")
    with torch.no_grad():
        prior.model.head.output_block[1][-1].bias.fill_(-1e4)
    image = torch.rand((2, 3, 60, 100), generator=torch.Generator().manual_seed(5))
    got, got_mask = prior(image)
    assert not got_mask.any()
    assert torch.isfinite(got).all()
    want, _, _ = _pinned_infer_reference(prior, image, focal_shift=(torch.ones(2), torch.zeros(2)))
    assert float((got - want).abs().max()) <= 7e-7 * float(want.abs().max())  # measured 2.4e-7


def _settings(**kw) -> PriorConfig:
    base = dict(device="cpu", request_timeout_s=60.0, startup_timeout_s=60.0, restart_budget=10)
    base.update(kw)
    return PriorConfig(**base)


def _check_priors(ring: FrameRing, refs: list[SlotRef], reference, start: int = 0) -> None:
    ref_pts, ref_mask = reference
    for k, ref in enumerate(refs):
        assert ring.has_prior(ref)
        got = ring.prior_points(ref)
        want = ref_pts[start + k]
        assert np.abs(got - want).max() <= TOL * max(1.0, np.abs(want).max())
        assert (ring.prior_mask(ref) == ref_mask[start + k]).all()


def _write(ring: FrameRing, frames: np.ndarray) -> list[SlotRef]:
    return [ring.write_frame(f, i, i / 30) for i, f in enumerate(frames)]


def _alive(pid: int) -> bool:
    from daemon.shm import pid_alive

    return pid_alive(pid)


def test_priors_match_in_process_and_no_frame_bytes_on_socket(loop, sidecar, frames, reference) -> None:
    ref_pts, ref_mask = reference
    assert 0.05 < ref_mask.mean() < 0.95, "tiny model must produce both valid and invalid pixels"
    assert np.isfinite(ref_pts).all()
    sent0, received0 = sidecar.bytes_sent, sidecar.bytes_received

    async def go() -> dict:
        ring = FrameRing.create("prior", 12, H, W)
        try:
            refs = _write(ring, frames[:8])
            timing = await sidecar.compute(ring, refs)
            _check_priors(ring, refs, reference)
            refs2 = _write(ring, frames[8:])  # a second window
            await sidecar.compute(ring, refs2)
            _check_priors(ring, refs2, reference, start=8)
            return timing
        finally:
            ring.close()
            ring.unlink()

    timing = loop.run_until_complete(go())
    sent, received = sidecar.bytes_sent - sent0, sidecar.bytes_received - received0
    assert timing["frames"] == 8 and timing["attempts"] == 1
    assert {"read_ms", "infer_ms", "write_ms", "total_ms", "wait_ms", "roundtrip_ms"} <= timing.keys()
    frame_bytes = frames.nbytes
    # Both requests and replies (~600 bytes) are far smaller than one frame (18 KiB).
    assert sent + received < 4096 < frame_bytes / len(frames), (sent, received)


def test_run_priors_blocking(checkpoint, frames, reference) -> None:
    pts, mask = run_priors(frames[:6], checkpoint, "cpu", chunk=CHUNK, n_slots=4, threads=1)
    # n_slots=4 -> batches of 4 and 2 frames; chunking equals the reference's for the first 4 frames.
    assert pts.shape == (6, H, W, 3) and pts.dtype == np.float32 and mask.dtype == np.bool_
    assert np.abs(pts[:4] - reference[0][:4]).max() <= TOL
    assert (mask[:4] == reference[1][:4]).all()
    assert np.abs(pts[4:] - reference[0][4:6]).max() <= 1e-4  # other batch split: BLAS order may differ
    assert not list(Path("/dev/shm").glob(f"geometryd-{os.getpid()}-offline*"))


def test_kill9_sidecar_during_request_is_retried(loop, sidecar, frames, reference) -> None:
    restarts0 = sidecar.restarts

    async def go() -> tuple[dict, int]:
        ring = FrameRing.create("crash", 12, H, W)
        try:
            first_pid = sidecar.pid
            refs = _write(ring, frames)
            task = asyncio.create_task(sidecar.compute(ring, refs))
            for _ in range(1000):  # wait until the sidecar is computing this request
                if (await sidecar.ping())["busy_s"] > 0:
                    break
                await asyncio.sleep(0.005)
            assert not task.done()
            os.kill(first_pid, signal.SIGKILL)
            timing = await asyncio.wait_for(task, 120)
            _check_priors(ring, refs, reference)
            return timing, first_pid
        finally:
            ring.close()
            ring.unlink()

    timing, old_pid = loop.run_until_complete(go())
    assert timing["attempts"] == 2 and sidecar.restarts == restarts0 + 1 and sidecar.pid != old_pid


def test_hung_sidecar_request_times_out_and_restarts(loop, sidecar, frames, reference) -> None:
    restarts0, cfg = sidecar.restarts, sidecar.cfg

    async def go() -> dict:
        ring = FrameRing.create("hang", 4, H, W)
        sidecar.cfg = replace(cfg, request_timeout_s=4.0)
        sidecar.ping_interval_s = 3600.0  # only the request timeout may notice the hang here
        try:
            os.kill(sidecar.pid, signal.SIGSTOP)  # hung: socket open, no answers
            refs = _write(ring, frames[:4])
            t0 = time.monotonic()
            timing = await sidecar.compute(ring, refs)
            assert 4.0 <= time.monotonic() - t0 < 60
            _check_priors(ring, refs, reference)
            return timing
        finally:
            sidecar.cfg = cfg
            sidecar.ping_interval_s = 5.0
            ring.close()
            ring.unlink()

    timing = loop.run_until_complete(go())
    assert timing["attempts"] == 2 and sidecar.restarts == restarts0 + 1


def test_health_check_restarts_a_frozen_idle_sidecar(loop, sidecar) -> None:
    restarts0, old_pid = sidecar.restarts, sidecar.pid

    async def go() -> None:
        sidecar.ping_interval_s, sidecar.ping_timeout_s = 0.3, 1.0
        try:
            os.kill(old_pid, signal.SIGSTOP)
            for _ in range(600):
                if sidecar.restarts > restarts0 and sidecar._connected.is_set():
                    break
                await asyncio.sleep(0.1)
            assert (await sidecar.ping())["op"] == "pong"
        finally:
            sidecar.ping_interval_s, sidecar.ping_timeout_s = 5.0, 10.0

    loop.run_until_complete(go())
    assert sidecar.restarts == restarts0 + 1 and sidecar.pid != old_pid and sidecar.connected
    assert _wait_dead(old_pid, 5.0) < 5.0


def test_restart_budget_exhausted_fails_requests_clearly(loop, sidecar, frames, reference) -> None:
    cfg = sidecar.cfg

    async def go() -> None:
        ring = FrameRing.create("budget", 2, H, W)
        try:
            sidecar.cfg = replace(cfg, restart_budget=len(sidecar._restart_times))  # no restart left
            os.kill(sidecar.pid, signal.SIGKILL)
            refs = _write(ring, frames[:2])
            with pytest.raises(SidecarUnavailable, match="restart budget exhausted"):
                await sidecar.compute(ring, refs)
            sidecar.cfg = cfg  # budget available again: the next request restarts it and succeeds
            await sidecar.compute(ring, refs)
            _check_priors(ring, refs, reference)
        finally:
            sidecar.cfg = cfg
            ring.close()
            ring.unlink()

    loop.run_until_complete(go())


class _RawClient:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.f = self.sock.makefile("rb")
        assert json.loads(self.f.readline())["op"] == "ready"

    def send(self, raw: bytes) -> dict:
        self.sock.sendall(raw)
        line = self.f.readline()
        assert len(line) < 4096
        return json.loads(line)

    def close(self) -> None:
        self.f.close()
        self.sock.close()


def test_bad_requests_get_clear_errors_and_sidecar_stays_up(loop, sidecar, frames, reference) -> None:
    restarts0, errors0 = sidecar.restarts, sidecar.errors

    async def go() -> None:
        ring = FrameRing.create("bad", 2, H, W)
        sc = sidecar
        try:
            refs = _write(ring, frames[:2])
            raw = await asyncio.to_thread(_RawClient, sc.socket_path)

            def call(obj_or_raw) -> dict:
                if isinstance(obj_or_raw, bytes):
                    return raw.send(obj_or_raw)
                data = (json.dumps(obj_or_raw) + "\n").encode()
                return raw.send(data)

            good = {"op": "prior", "id": 1, "ring": ring.name, "slots": [refs[0].slot],
                    "generations": [refs[0].generation]}
            cases = [
                (b"{not json\n", "bad_request", "invalid JSON"),
                (b"[1, 2]\n", "bad_request", "JSON object"),
                ({"op": "explode", "id": 2}, "bad_request", "unknown op"),
                ({**good, "slots": "0"}, "bad_request", "int lists"),
                ({**good, "generations": []}, "bad_request", "equal length"),
                ({**good, "ring": "/etc/passwd"}, "bad_request", "geometryd-"),
                ({**good, "ring": "geometryd-999999-gone"}, "unknown_ring", "geometryd-999999-gone"),
                ({**good, "slots": [7]}, "bad_request", "out of range"),
                ({**good, "generations": [refs[0].generation + 100]}, "stale_slot", "generation"),
            ]
            for req, kind, text in cases:
                reply = await asyncio.to_thread(call, req)
                assert reply["op"] == "error" and reply["kind"] == kind, (req, reply)
                assert text in reply["error"], (req, reply)
            # a slot rewritten after the request was formed
            ring.release(refs[0])
            stale = ring.write_frame(frames[1], 1, 0.0)
            assert stale.slot == refs[0].slot
            reply = await asyncio.to_thread(call, {**good, "id": 3})
            assert reply["kind"] == "stale_slot" and "expected" in reply["error"]
            # still serving, on both connections
            assert (await asyncio.to_thread(call, {"op": "ping", "id": 4}))["op"] == "pong"
            reply = await asyncio.to_thread(
                call, {**good, "id": 5, "slots": [stale.slot], "generations": [stale.generation]})
            assert reply["op"] == "done" and reply["id"] == 5
            raw.close()
            await sc.compute(ring, [stale])
            _check_priors(ring, [stale], reference, start=1)
            with pytest.raises(PriorRequestError) as err:
                await sc.compute(ring, [refs[0]])
            assert err.value.kind == "stale_slot"
            assert sc.restarts == restarts0 and sc.errors == errors0 + 1
        finally:
            ring.close()
            ring.unlink()

    loop.run_until_complete(go())


_DAEMON_CHILD = """
    import asyncio, sys, numpy as np
    from pathlib import Path
    from daemon.shm import FrameRing
    from daemon.config import PriorConfig
    from daemon.stages.prior import PriorSidecar

    async def main():
        ring = FrameRing.create('victim', 2, 16, 16)
        sc = PriorSidecar(PriorConfig(device='cpu', startup_timeout_s=60), Path(sys.argv[1]), threads=1)
        await sc.start()
        ref = ring.write_frame(np.zeros((16, 16, 3), np.uint8), 0, 0.0)
        await sc.compute(ring, [ref])
        print(ring.name, sc.pid, flush=True)
        await asyncio.sleep(600)

    asyncio.run(main())
"""


def _start_daemon_child(checkpoint: Path) -> tuple[subprocess.Popen, str, int]:
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_DAEMON_CHILD), str(checkpoint)], cwd=ROOT,
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
    line = p.stdout.readline().split()
    assert len(line) == 2, "daemon child failed to start"
    return p, line[0], int(line[1])


def _wait_dead(pid: int, limit: float) -> float:
    t0 = time.monotonic()
    while _alive(pid):
        if time.monotonic() - t0 > limit:
            return float("inf")
        time.sleep(0.02)
    return time.monotonic() - t0


def test_daemon_kill9_sidecar_exits_and_no_stale_segments(checkpoint) -> None:
    # 1) SIGKILL of the daemon process alone: its sidecar notices within 2 s.
    p, name, sidecar_pid = _start_daemon_child(checkpoint)
    try:
        assert _alive(sidecar_pid)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        assert _wait_dead(sidecar_pid, 5.0) < 2.0
    finally:
        with_suppress_killpg(p.pid)

    # 2) SIGKILL of everything (daemon, its resource tracker, sidecar: systemd's final kill of the cgroup).
    p, name, sidecar_pid = _start_daemon_child(checkpoint)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    assert _wait_dead(sidecar_pid, 5.0) < 2.0
    assert Path("/dev/shm", name).exists(), "precondition: the segment leaked"
    # restart: creating a ring cleans stale segments first
    ring = FrameRing.create("restart", 1, 4, 4)
    try:
        assert not Path("/dev/shm", name).exists()
        leftovers = [e.name for e in Path("/dev/shm").iterdir()
                     if e.name.startswith(f"geometryd-{p.pid}-")]
        assert leftovers == []
        assert cleanup_stale_segments() == []
    finally:
        ring.close()
        ring.unlink()


def with_suppress_killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_startup_failure_is_reported(tmp_path) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a torch checkpoint")

    async def go() -> None:
        with pytest.raises(PriorError, match="checkpoint not found"):
            await PriorSidecar(_settings(), tmp_path / "missing.pt").start()
        sc = PriorSidecar(_settings(startup_timeout_s=60), broken)
        with pytest.raises(PriorError, match="exited with code"):
            await sc.start()
        await sc.stop()

    asyncio.run(go())


def _torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
def test_cuda_sidecar_matches_in_process_and_fp16_is_close(loop, checkpoint, frames) -> None:
    if not _torch_cuda():
        pytest.skip("needs a CUDA build of torch and a GPU")
    import torch

    from moge_sidecar.infer import frames_to_image, load_moge

    ref = load_moge(checkpoint, "cuda")
    want = [ref(frames_to_image(torch.from_numpy(frames[i:i + CHUNK])))[0].cpu().numpy()
            for i in range(0, 8, CHUNK)]
    want = np.concatenate(want)

    async def go(fp16: bool) -> tuple[np.ndarray, np.ndarray]:
        ring = FrameRing.create("gpu", 8, H, W)
        try:
            async with PriorSidecar(_settings(device="cuda", fp16=fp16), checkpoint, chunk=CHUNK) as sc:
                refs = _write(ring, frames[:8])
                await sc.compute(ring, refs)
                return (np.stack([ring.prior_points(r) for r in refs]),
                        np.stack([ring.prior_mask(r) for r in refs]))
        finally:
            ring.close()
            ring.unlink()

    pts32, mask32 = loop.run_until_complete(go(False))
    assert np.abs(pts32 - want).max() <= TOL * max(1.0, np.abs(want).max())
    pts16, mask16 = loop.run_until_complete(go(True))
    assert np.isfinite(pts16).all() and (mask16 == mask32).mean() > 0.95
