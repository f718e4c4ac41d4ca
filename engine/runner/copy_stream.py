"""Adapter copies on a side CUDA stream, and the waits that make a forward pass safe.

Ordering, step by step (one step = the plan's copies are queued, then one forward):

- A copy is queued on the side stream after the work already on the main stream
  (`wait_stream`): the main stream is drained at the end of every step anyway (the
  sampled tokens are read on the host), so this costs nothing and guarantees that
  no copy overwrites pages or table rows that an earlier forward is still reading.
- Before the forward, the main stream waits for the copies of the slots the batch
  reads (`wait_for(slots)`), and for every copy queued in an earlier step: the pool
  may have reclaimed those pages for KV since, and a KV write must not race a late
  copy. Copies of adapters brought in ahead of their requests are the ones left
  running beside the forward.
- The host copy (pinned) is kept referenced until its copy has finished on the GPU,
  even if the host tier dropped it meanwhile.

Timings come from CUDA events, read once the copy is done.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch

MAX_RECORDED_COPIES = 10_000
"""Copy durations kept for the metrics reader; with none (under `LLM`) the oldest go."""


@dataclass
class _Copy:
    start: torch.cuda.Event
    end: torch.cuda.Event
    step: int
    keep: Any
    """The host copy the transfer reads, kept alive until `end` has passed."""


class SideStreamCopies:
    """Copies queued on one side stream, by slot, until the main stream waited for them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._in_flight: dict[int, _Copy] = {}  # slot -> its copy, not yet waited for
        self._waited: list[_Copy] = []  # waited for by the main stream, maybe not done
        self._seconds: deque[float] = deque(maxlen=MAX_RECORDED_COPIES)
        self._step = 0

    def run(self, slot: int, copy: Callable[[], None], keep: Any) -> None:
        """Queue `copy` (the host-to-device transfer and table writes of `slot`)."""
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            start.record()
            copy()
            end.record()
        previous = self._in_flight.pop(slot, None)
        step = self._step
        if previous is not None:  # its slot was reclaimed before any batch read it
            self._waited.append(previous)
            # Its pages may hold KV from the next forward on: waiting for this copy, queued
            # after it on the same stream, must happen when waiting for it would have.
            step = previous.step
        self._in_flight[slot] = _Copy(start, end, step, keep)

    def wait_for(self, slots: Collection[int]) -> None:
        """Order the main stream after the copies of `slots` and every earlier step's copy."""
        current = torch.cuda.current_stream(self.device)
        for slot, copy in list(self._in_flight.items()):
            if slot in slots or copy.step < self._step:
                current.wait_event(copy.end)
                del self._in_flight[slot]
                self._waited.append(copy)
        self._step += 1
        self._collect_finished()

    def drain_seconds(self) -> list[float]:
        """Durations of the copies that have finished since the last call."""
        self._collect_finished()
        taken = list(self._seconds)
        self._seconds.clear()
        return taken

    def _collect_finished(self) -> None:
        """Record the durations of finished copies and let go of their host copies."""
        pending = []
        for copy in self._waited:
            if copy.end.query():
                self._seconds.append(copy.start.elapsed_time(copy.end) / 1000)
            else:
                pending.append(copy)
        self._waited = pending
