"""Views of the daemon's state for people and probes: loop-lag statistics and one quantile helper."""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any


def quantiles(xs: list[float]) -> dict[str, float] | None:
    """p50 / p90 / p99 / max of ``xs`` (nearest rank below), None when empty."""
    if not xs:
        return None
    s = sorted(xs)
    return {"p50": statistics.median(s), "p90": s[int(0.9 * (len(s) - 1))],
            "p99": s[int(0.99 * (len(s) - 1))], "max": s[-1]}


@dataclasses.dataclass
class LagStats:
    """Event-loop lag samples (seconds), all and while the geometry worker runs."""

    samples: list[float] = dataclasses.field(default_factory=list)
    busy_samples: list[float] = dataclasses.field(default_factory=list)  # while the geometry worker runs

    def summary(self) -> dict[str, Any]:
        def stats(xs: list[float]) -> dict[str, float]:
            q = quantiles(xs)
            if q is None:
                return {"n": 0}
            return {"n": len(xs), "p50_ms": 1e3 * q["p50"], "p99_ms": 1e3 * q["p99"],
                    "max_ms": 1e3 * q["max"]}

        return {"all": stats(self.samples), "geometry_busy": stats(self.busy_samples)}
