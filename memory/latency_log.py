"""Durations recorded between two reads of the engine's stats, bounded.

The engine records how long each adapter read (memory/adapter_catalog.py), each copy into
the pool (engine/runner/device_pool.py) and each step (engine/core/core.py) took; /metrics
takes them for its histograms. With nobody reading the stats (the `LLM` class), only the
latest `MAX_RECORDED` are kept.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

MAX_RECORDED = 10_000


class LatencyLog:
    """Seconds recorded since the last `drain`, at most MAX_RECORDED of them."""

    def __init__(self) -> None:
        self._seconds: deque[float] = deque(maxlen=MAX_RECORDED)

    def record(self, seconds: float) -> None:
        self._seconds.append(seconds)

    def extend(self, seconds: Iterable[float]) -> None:
        self._seconds.extend(seconds)

    def drain(self) -> list[float]:
        """What was recorded since the last call; forgotten here."""
        taken = list(self._seconds)
        self._seconds.clear()
        return taken
