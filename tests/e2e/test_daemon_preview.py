"""The preview tier end to end: `geometryd run` as a real subprocess (real MoGe sidecar, shared memory, a real
mosquitto), the geometry stage replaced by the plumbing-only identity processor (result = raw prior, scale
1) so the test needs no Jittor compile. Checks topics, `tier`, counters and units (docs/streaming.md)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from daemon.broker import Mosquitto
from helpers.clips import make_clip
from helpers.mqtt import Collector
from helpers.run_daemon import (  # noqa: F401 (fixture)
    DaemonProcess,
    assert_balanced,
    base_sections,
    daemon_procs,
    tiny_model,
    write_config,
)

pytestmark = pytest.mark.e2e

N = 24


class _Collect:
    def __init__(self, port: int, prefix: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.c = Collector("127.0.0.1", port, prefix)
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        task = self.loop.create_task(self.c.run())

        async def mark() -> None:
            await self.c.ready.wait()
            self.ready.set()

        self.loop.create_task(mark())
        try:
            self.loop.run_until_complete(task)
        except BaseException:
            pass

    def close(self) -> None:
        for t in asyncio.all_tasks(self.loop):
            self.loop.call_soon_threadsafe(t.cancel)
        self.thread.join(5)


def _run(tmp_path: Path, tiny_model: Path, daemon_procs: list, preview: bool) -> tuple[dict, list]:
    clip = make_clip(tmp_path / "clip.mp4", N)
    with Mosquitto(tmp_path / "mq") as broker:
        col = _Collect(broker.port, "pv")
        try:
            sections = base_sections(tiny_model, mqtt_port=broker.port,
                                     mqtt={"topic_prefix": "pv", "publish_points": True})
            cfg = write_config(tmp_path / "cfg.toml", sections,
                               {"cam": {"type": "file", "path": str(clip), "preview": preview}})
            d = DaemonProcess(cfg, tmp_path, extra_args=["--plumbing-identity-delay", "0.3"])
            daemon_procs.append(d)
            assert d.wait(300) == 0, d.log_text()[-4000:]
            import time

            time.sleep(0.5)
            return d.summary(), list(col.c.messages)
        finally:
            col.close()


def test_preview_tier_topics_counters_and_units(tiny_model: Path, tmp_path: Path, daemon_procs: list) -> None:
    summary, msgs = _run(tmp_path, tiny_model, daemon_procs, preview=True)
    s = assert_balanced(summary, "cam")
    assert s["frames_out"] == N
    pv = s["previews"]
    assert pv == {**pv, "in": N, "out": N, "dropped": {}, "balanced": True}
    by_topic: dict[str, list] = {}
    for m in msgs:
        by_topic.setdefault(m.topic, []).append(m)
    for kind in ("depth", "points"):
        refined = by_topic[f"pv/cam/{kind}"]
        preview = by_topic[f"pv/cam/preview/{kind}"]
        assert sorted(int(m.user["frame_index"]) for m in refined) == list(range(N))
        assert sorted(int(m.user["frame_index"]) for m in preview) == list(range(N))
        assert {m.user["tier"] for m in refined} == {"refined"}
        assert {m.user["tier"] for m in preview} == {"preview"}
        assert {m.user["kind"] for m in preview} == {kind}
        # the refined tier's properties (values differ), except window_fps (its window is not complete yet)
        assert set(preview[0].user) == set(refined[0].user) - {"window_fps"}
        assert all(float(m.user["window_fps"]) == pytest.approx(30.0, rel=1e-3) for m in refined)
    # units: the identity result is the raw prior; a preview is the prior / prior_scale (its property)
    from daemon.wire.encoding import decode_depth

    refined = {int(m.user["frame_index"]): m for m in by_topic["pv/cam/depth"]}
    for m in by_topic["pv/cam/preview/depth"]:
        scale = float(m.user["prior_scale"])
        r = refined[int(m.user["frame_index"])]
        dp, vp = decode_depth(m.payload, m.user)
        dr, vr = decode_depth(r.payload, r.user)
        both = vp & vr
        np.testing.assert_allclose(dp[both] * scale, dr[both], rtol=2e-3)  # f16 rounding of the preview
    assert pv["latency_s"]["p50"] < s["latency_s"]["p50"]


def test_preview_off(tiny_model: Path, tmp_path: Path, daemon_procs: list) -> None:
    summary, msgs = _run(tmp_path, tiny_model, daemon_procs, preview=False)
    s = assert_balanced(summary, "cam")
    assert s["previews"]["in"] == 0 and s["previews"]["out"] == 0
    assert not [m for m in msgs if "/preview/" in m.topic]
    assert len([m for m in msgs if m.topic == "pv/cam/depth"]) == N
