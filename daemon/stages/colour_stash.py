"""The input frames (as JPEG) of admitted frames until their refined result is published, for the sinks that
publish colour (MCAP, live Foxglove). The ring slot of a frame may be reused before its result comes back
(results of a window are published after the window's slots are released), so the colour is kept here, small.

Bounded: a frame that never gets a result (dropped) is evicted oldest-first once ``capacity`` is reached.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from daemon.wire.jpeg import encode_jpeg


class ColourStash:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"colour stash capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._jpegs: OrderedDict[int, bytes] = OrderedDict()
        self.evicted = 0

    def put(self, seq: int, image: np.ndarray) -> None:
        self._jpegs[seq] = encode_jpeg(image)
        while len(self._jpegs) > self.capacity:
            self._jpegs.popitem(last=False)
            self.evicted += 1

    def take(self, seq: int) -> bytes | None:
        return self._jpegs.pop(seq, None)

    def __len__(self) -> int:
        return len(self._jpegs)
