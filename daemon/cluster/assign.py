"""Assigning sources to GPU actors: a pure function (no Ray), so the policy is tested on its own.

A source costs ``width x height x fps`` (pixels per second the geometry stage must follow; the processing
size is the same for all sources of one config, the fps is the source's own). An actor's capacity is what
its warm-up measured (pixels per second of one window), or 1.0 per GPU share before any measurement. The
policy is "longest processing time first": sources by decreasing cost, each to the live actor whose load
after adding it, relative to its capacity, is lowest. Sources already on a live actor stay there (a move
costs a restart of the source's window state), so only new and orphaned sources are placed.
"""

from __future__ import annotations

from collections.abc import Mapping


def source_cost(width: int, height: int, fps: float) -> float:
    return float(width) * float(height) * max(float(fps), 0.0)


def assign(costs: Mapping[str, float], capacity: Mapping[str, float],
           current: Mapping[str, str] | None = None) -> dict[str, str]:
    """source -> actor for every source in ``costs`` over the actors in ``capacity`` (the live ones).

    ``current`` (source -> actor) is kept where its actor is still in ``capacity``. Ties go to the actor
    that sorts first, so the result is deterministic. Raises ValueError when there is no live actor."""
    if not capacity:
        raise ValueError("no live actor to assign sources to")
    for name, cap in capacity.items():
        if cap <= 0:
            raise ValueError(f"actor {name}: capacity must be > 0, got {cap}")
    out: dict[str, str] = {}
    load = {a: 0.0 for a in capacity}
    for src, actor in (current or {}).items():
        if src in costs and actor in capacity:
            out[src] = actor
            load[actor] += costs[src]
    todo = sorted((s for s in costs if s not in out), key=lambda s: (-costs[s], s))
    for src in todo:
        best = min(sorted(capacity), key=lambda a: (load[a] + costs[src]) / capacity[a])
        out[src] = best
        load[best] += costs[src]
    return out


def relative_load(assignment: Mapping[str, str], costs: Mapping[str, float],
                  capacity: Mapping[str, float]) -> dict[str, float]:
    """Per actor: assigned cost / capacity (1.0 = as much as its warm-up says it can follow)."""
    load = {a: 0.0 for a in capacity}
    for src, actor in assignment.items():
        if actor in load:
            load[actor] += costs.get(src, 0.0)
    return {a: load[a] / capacity[a] for a in capacity}
