"""The source -> GPU actor assignment policy (a pure function) and the per-run daemon config of an actor."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.cluster.assign import assign, relative_load, source_cost
from daemon.cluster.gpu_actor import run_config
from daemon.config import parse_config, to_toml


def test_cost_is_pixels_per_second() -> None:
    assert source_cost(640, 384, 30) == 640 * 384 * 30
    assert source_cost(640, 384, -1) == 0.0


def test_longest_first_balances_by_capacity() -> None:
    costs = {"big": 8.0, "m1": 4.0, "m2": 4.0, "s": 1.0}
    got = assign(costs, {"g0": 1.0, "g1": 1.0})
    assert got == {"big": "g0", "m1": "g1", "m2": "g1", "s": "g0"}
    assert relative_load(got, costs, {"g0": 1.0, "g1": 1.0}) == {"g0": 9.0, "g1": 8.0}
    # an actor measured twice as fast takes twice the load
    fast = assign({"a": 1.0, "b": 1.0, "c": 1.0}, {"slow": 1.0, "fast": 2.0})
    assert sorted(s for s, a in fast.items() if a == "fast") == ["a", "b"]


def test_equal_sources_two_actors_deterministic() -> None:
    assert assign({"a": 1.0, "b": 1.0, "c": 1.0}, {"gpu-0": 1.0, "gpu-1": 1.0}) == {
        "a": "gpu-0", "b": "gpu-1", "c": "gpu-0"}


def test_sources_stay_put_and_orphans_move_to_the_least_loaded() -> None:
    costs = {"a": 2.0, "b": 1.0, "c": 1.0, "d": 1.0}
    current = {"a": "g0", "b": "g1", "c": "g2", "d": "g2"}  # g2 died
    got = assign(costs, {"g0": 1.0, "g1": 1.0}, current)
    assert got == {"a": "g0", "b": "g1", "c": "g1", "d": "g0"}
    assert relative_load(got, costs, {"g0": 1.0, "g1": 1.0}) == {"g0": 3.0, "g1": 2.0}


def test_no_live_actor_or_bad_capacity() -> None:
    with pytest.raises(ValueError, match="no live actor"):
        assign({"a": 1.0}, {})
    with pytest.raises(ValueError, match="capacity"):
        assign({"a": 1.0}, {"g0": 0.0})


def test_run_config_restricts_sources_and_disables_http(tmp_path: Path) -> None:
    clip = tmp_path / "x.mp4"
    clip.write_bytes(b"")
    cfg = parse_config({"sources": {n: {"type": "file", "path": str(clip)} for n in ("a", "b", "c")}}, tmp_path)
    run = run_config(to_toml(cfg), ["b"], "geometryd-gpu-0-r1")
    assert list(run.sources) == ["b"] and run.sources["b"] == cfg.sources["b"]
    assert run.http.enabled is False and run.mqtt.client_id == "geometryd-gpu-0-r1"
    assert run.geometry == cfg.geometry and run.model == cfg.model
    with pytest.raises(ValueError, match="unknown sources"):
        run_config(to_toml(cfg), ["zzz"], "x")
