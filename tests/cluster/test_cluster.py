"""`geometryd cluster` on a real local Ray cluster with two logical GPUs: real GPU actors (Ray worker
processes) each running a real daemon (MoGe sidecar, shm rings, geometry worker), a real mosquitto broker,
and a SIGKILL of one actor's process mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.broker import Mosquitto, free_port
from helpers import procs
from helpers.clips import make_clip
from helpers.run_daemon import (
    REPO,
    Subscriber,
    base_sections,
    tiny_model,  # noqa: F401 (fixture)
    write_config,
)

# minutes of start-up when loaded
pytestmark = [pytest.mark.e2e, pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1800)]

N_FRAMES = 30
TIMEOUT = 900  # per wait; a loaded 2-core box needs minutes for the daemons to start


class StatusWatcher:
    """Every message on the retained ``<prefix>/cluster/status`` topic, parsed (paho, own thread)."""

    def __init__(self, port: int, prefix: str) -> None:
        import paho.mqtt.client as paho

        self.messages: list[dict[str, Any]] = []
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.on_message = lambda _c, _u, msg: self.messages.append({**json.loads(msg.payload),
                                                                            "_retain": msg.retain})
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"{prefix}/cluster/status", qos=1)
        self.client.loop_start()

    def latest(self) -> dict[str, Any] | None:
        return self.messages[-1] if self.messages else None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class ClusterProcess:
    def __init__(self, config: Path, workdir: Path) -> None:
        self.summary_path = workdir / "cluster-summary.json"
        self.log_path = workdir / "cluster.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen([sys.executable, "-m", "daemon", "cluster", "--config", str(config),
                                      "--exit-when-done", "--summary", str(self.summary_path)],
                                     cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=dict(os.environ))

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def log_text(self) -> str:
        return self.log_path.read_text()

    def summary(self) -> dict[str, Any]:
        return json.loads(self.summary_path.read_text())


def _config(tmp_path: Path, model: Path, port: int, prefix: str, max_restarts: int) -> Path:
    clips = {name: make_clip(tmp_path / f"{name}.mp4", N_FRAMES) for name in ("a", "b", "c")}
    sections = base_sections(model, mqtt_port=port, http_port=free_port(), mqtt={"topic_prefix": prefix},
                             overload={"policy": "queue"})
    sections["cluster"] = {"address": "local", "local_gpus": 2, "local_cpus": 2, "object_store_mb": 100,
                           "max_restarts": max_restarts, "restart_timeout_s": 60.0, "status_interval_s": 0.5,
                           "http_port": free_port()}
    return write_config(tmp_path / "cluster.toml", sections,
                        {n: {"type": "file", "path": str(p)} for n, p in clips.items()})


def _by_source(frames: list[Any]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for f in frames:
        out.setdefault(f.source, []).append(f.frame_index)
    return out


def test_two_gpus_three_sources_every_frame_once(tiny_model: Path, tmp_path: Path) -> None:
    prefix = "clu1"
    with Mosquitto(tmp_path / "mq") as broker:
        sub = Subscriber(broker.port, prefix=prefix)
        status = StatusWatcher(broker.port, prefix)
        proc = ClusterProcess(_config(tmp_path, tiny_model, broker.port, prefix, 1), tmp_path)
        try:
            t0 = time.monotonic()
            rc = proc.wait(TIMEOUT)
            print(f"cluster run: {time.monotonic() - t0:.1f} s")
            assert rc == 0, proc.log_text()[-5000:]
            assert sub.wait_count(3 * N_FRAMES, 10), (len(sub.frames), proc.log_text()[-3000:])
            time.sleep(0.3)
        finally:
            proc.kill()
            sub.close()
            status.close()
    summary = proc.summary()
    # both logical GPUs got an actor; the three sources are spread 2 + 1 (equal costs)
    actors = summary["actors"]
    assert sorted(actors) == ["gpu-0", "gpu-1"]
    assert sorted(g for a in actors.values() for g in a["gpu_ids"]) == ["0", "1"]
    assert sorted(summary["assignment"]) == ["a", "b", "c"]
    assert sorted(len(a["sources"]) for a in actors.values()) == [1, 2]
    assert summary["moves"] == []
    got = _by_source(sub.frames)
    for name in ("a", "b", "c"):
        assert sorted(got[name]) == list(range(N_FRAMES)), name  # exactly once each
        s = summary["sources"][name]
        assert s == {**s, "frames_in": N_FRAMES, "frames_out": N_FRAMES, "skipped": 0, "dropped": {},
                     "balanced": True, "state": "done"}
    for f in sub.frames:
        assert f.properties["depth"]["source"] == f.source
        assert f.depth.shape == (64, 128) and f.points.shape == (64, 128, 3)
    # the retained status topic carried the assignment while serving, and is retained
    serving = [m for m in status.messages if m["state"] == "ready"]
    assert serving and serving[-1]["assignment"] == summary["assignment"]


@pytest.mark.parametrize("max_restarts", [0, 1], ids=["moved", "restarted"])
def test_sigkill_actor_sources_recover_and_frames_accounted(tiny_model: Path, tmp_path: Path,
                                                             max_restarts: int) -> None:
    """max_restarts = 0: the killed actor cannot come back, so its source moves to the live actor;
    max_restarts = 1: Ray restarts the actor on its GPU and the source starts there again."""
    prefix = f"clu2r{max_restarts}"
    with Mosquitto(tmp_path / "mq") as broker:
        sub = Subscriber(broker.port, prefix=prefix)
        status = StatusWatcher(broker.port, prefix)
        proc = ClusterProcess(_config(tmp_path, tiny_model, broker.port, prefix, max_restarts), tmp_path)
        try:
            procs.wait_for(lambda: status.latest() is not None and status.latest()["state"] == "ready", TIMEOUT,
                           "the cluster to be ready", proc)
            st = status.latest()
            victim = next(a for a, v in st["actors"].items() if len(v["sources"]) == 1)
            (moved,) = st["actors"][victim]["sources"]
            pid = st["actors"][victim]["pid"]
            procs.wait_for(lambda: moved in _by_source(sub.frames), TIMEOUT, f"first frames of {moved}", proc)
            os.kill(pid, signal.SIGKILL)
            t_kill = time.monotonic()
            before = len(_by_source(sub.frames)[moved])
            procs.wait_for(lambda: _by_source(sub.frames)[moved].count(0) >= 2, TIMEOUT,
                           f"{moved} to publish again after the kill", proc)
            recovery_s = time.monotonic() - t_kill
            print(f"SIGKILL of {victim} (pid {pid}) -> {moved} publishing again: {recovery_s:.1f} s "
                  f"({before} frames of {moved} before the kill)")
            rc = proc.wait(TIMEOUT)
            assert rc == 0, proc.log_text()[-5000:]
            time.sleep(0.5)
        finally:
            proc.kill()
            sub.close()
            status.close()
    summary = proc.summary()
    (move,) = summary["moves"]
    assert move["source"] == moved and move["recovery_s"] is not None and move["recovery_s"] > 0
    print(f"controller-measured recovery ({move['kind']}): {move['recovery_s']:.1f} s")
    shown = [m for m in status.messages if m["state"] == "ready" and m["moves"]]  # while serving
    assert shown and shown[0]["assignment"][moved] == move["to"] and shown[0]["moves"][0]["kind"] == move["kind"]
    if max_restarts == 0:
        assert summary["actors"][victim]["state"] == "dead"
        assert move["from"] == victim and move["kind"] == "moved" and move["to"] != victim
        assert shown[0]["actors"][victim]["state"] == "dead"
    else:
        assert move["kind"] == "restarted" and move["to"] == victim
        assert summary["actors"][victim]["restarts"] == 1 and summary["actors"][victim]["pid"] != pid
    assert summary["assignment"][moved] == move["to"]

    got = _by_source(sub.frames)
    for name, s in summary["sources"].items():
        assert s["balanced"], (name, s)
        if name != moved:
            assert sorted(got[name]) == list(range(N_FRAMES)), name
            assert s["frames_out"] == N_FRAMES and s["dropped"] == {}
    s = summary["sources"][moved]
    # the moved source ran again from its first frame: all frames arrived, and what the dead run had
    # taken in without publishing (by its last status) is counted as dropped{actor_died}, not silent
    assert sorted(set(got[moved])) == list(range(N_FRAMES))
    assert s["frames_in"] > N_FRAMES and s["frames_in"] == s["frames_out"] + s["skipped"] + sum(s["dropped"].values())
    assert s["state"] == "done" and set(s["dropped"]) <= {"actor_died"}
    assert len(got[moved]) >= s["frames_out"]  # every frame counted as out did reach the subscriber
