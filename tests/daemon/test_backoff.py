"""The one retry backoff (daemon/backoff.py): bounds, growth, cap, reset, and that the three retry loops use it."""

from __future__ import annotations

import inspect
import random

import pytest

from daemon.backoff import JITTER_LOW, Backoff
from daemon.stages import ingest_rtsp, prior, publish_mqtt


def test_bounds_growth_and_cap() -> None:
    b = Backoff(0.5, 30.0, random.Random(1))
    caps = []
    for _ in range(12):
        cap = b.cap()
        delay = b.next()
        assert JITTER_LOW * cap <= delay <= cap
        caps.append(cap)
    assert caps[:7] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0] and set(caps[6:]) == {30.0}
    assert b.failures == 12


def test_jitter_spreads_over_the_upper_half() -> None:
    b = Backoff(1.0, 1.0, random.Random(2))
    delays = [b.next() for _ in range(2000)]
    assert min(delays) >= 0.5 and max(delays) <= 1.0
    assert min(delays) < 0.52 and max(delays) > 0.98  # really random, not a constant factor
    assert 0.73 < sum(delays) / len(delays) < 0.77  # uniform(0.5, 1): mean 0.75


def test_reset_and_long_outage() -> None:
    b = Backoff(0.1, 2.0, random.Random(3))
    for _ in range(5000):  # a long outage: the exponent must not overflow
        assert b.next() <= 2.0
    b.reset()
    assert b.failures == 0 and b.cap() == 0.1 and b.next() <= 0.1


def test_rejects_bad_bounds() -> None:
    for initial, maximum in ((0.0, 1.0), (2.0, 1.0), (-1.0, 1.0)):
        with pytest.raises(ValueError, match="initial_s"):
            Backoff(initial, maximum)


def test_every_retry_loop_uses_it() -> None:
    # the RTSP reconnect, the sidecar restart and the MQTT reconnect: no private exponential formula left
    for module in (ingest_rtsp, prior, publish_mqtt):
        src = inspect.getsource(module)
        assert "Backoff(" in src and "2 **" not in src and "* 2," not in src, module.__name__
