"""The one retry backoff: exponential growth with "equal jitter", reset after a success.

The n-th wait (n = 0, 1, ... since the last reset) is ``uniform(0.5, 1) x min(maximum, initial * 2**n)``
(AWS calls this "equal jitter"). Not "full jitter" (``uniform(0, cap)``): half of the cap is always waited, so
a dead camera, broker or sidecar is never hammered with near-zero retries, while the random other half keeps
many daemons (or sources) that lost the same server from retrying in lockstep. Used by the RTSP reconnect,
the MQTT reconnect and the MoGe sidecar restart.
"""

from __future__ import annotations

import random

JITTER_LOW = 0.5  # smallest fraction of the capped exponential delay that is waited


class Backoff:
    """Delays between retries: ``next()`` after each failure, ``reset()`` after a success."""

    def __init__(self, initial_s: float, maximum_s: float, rng: random.Random | None = None) -> None:
        if not 0 < initial_s <= maximum_s:
            raise ValueError(f"backoff needs 0 < initial_s <= maximum_s, got {initial_s} and {maximum_s}")
        self.initial_s, self.maximum_s = initial_s, maximum_s
        self._rng = rng or random.Random()
        self.failures = 0  # next() calls since the last reset

    def cap(self) -> float:
        """The upper bound of the next delay: ``min(maximum, initial * 2**failures)``."""
        # the exponent is bounded so a long outage cannot overflow the float
        return min(self.maximum_s, self.initial_s * 2.0 ** min(self.failures, 64))

    def next(self) -> float:
        """The seconds to wait before the next try (and count one more failure)."""
        delay = self.cap() * self._rng.uniform(JITTER_LOW, 1.0)
        self.failures += 1
        return delay

    def reset(self) -> None:
        """A try succeeded: the next delay starts from ``initial_s`` again."""
        self.failures = 0
