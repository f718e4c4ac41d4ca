"""How many threads a CPU step runs on: as many as configured, or one, whichever costs less.

A step on N threads runs hundreds of parallel regions (torch's and the native kernels', one
OpenMP pool), and each ends when its slowest thread does. When another process takes a core
(a busy host; a Kubernetes CPU limit, which the kernel enforces by pausing the whole group
of threads for the rest of its period), the thread it displaces is off its core for a time
slice, milliseconds, and every region waits for it: on 2 cores with one busy-looping
process, a benchmark of 0.36 s took 11.5 s on two threads and 0.58 s on one (issue 25).
One thread never waits for another. Which is faster depends on the load, which changes, so
`ThreadGovernor` measures: it runs steps on the cheaper choice and, now and then, one step
on the other, spending at most about 1/`PROBE_BUDGET` of the time on such probes.

Steps are compared by size class (tokens, in powers of two), since a prefill chunk and a
decode batch differ in cost per token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")
ONE_THREAD_MARGIN = 0.75
"""One thread is chosen only when its steps cost under this fraction of many threads' steps:
on a quiet machine, one step's noise must not move the engine to one thread (a contended
machine makes one thread several times cheaper, not a little)."""
PROBE_BUDGET = 20
"""A probe of the other choice runs once the steps on the current one have taken this many
times what the probe is expected to cost: at most ~5% of the time goes to probing."""


@dataclass
class _SizeClass:
    cost: dict[int, float]
    """Seconds per step on each thread count measured (the current choice: a moving average;
    the other: its last probe)."""
    since_probe: float = 0.0
    """Seconds spent on the current choice since the last probe."""


class ThreadGovernor:
    """Runs each step's compute on `threads` threads or one, whichever the steps of its
    size measured cheaper (`threads` 1: always one, nothing measured)."""

    def __init__(self, threads: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.threads = threads
        self.clock = clock
        self._classes: dict[int, _SizeClass] = {}
        self.num_probes = 0

    def run(self, num_tokens: int, work: Callable[[], T]) -> T:
        """`work()` (a step's compute, synchronous on the CPU) on the thread count chosen for
        a step of `num_tokens` tokens; its time is recorded."""
        if self.threads == 1:
            return work()
        size = self._classes.get(num_tokens.bit_length())
        if size is None:
            size = self._classes[num_tokens.bit_length()] = _SizeClass({})
        threads, probing = self._choose(size)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        start = self.clock()
        result = work()
        elapsed = self.clock() - start
        if probing:
            self.num_probes += 1
            size.cost[threads] = elapsed
            size.since_probe = 0.0
        else:
            previous = size.cost.get(threads)
            size.cost[threads] = elapsed if previous is None else 0.7 * previous + 0.3 * elapsed
            size.since_probe += elapsed
        return result

    def _choose(self, size: _SizeClass) -> tuple[int, bool]:
        """(threads, whether this step is a probe of the costlier or unmeasured choice)."""
        many, one = size.cost.get(self.threads), size.cost.get(1)
        if many is None:
            return self.threads, False
        if one is None:
            return 1, True
        best, other = (1, self.threads) if one < ONE_THREAD_MARGIN * many else (self.threads, 1)
        if size.since_probe >= PROBE_BUDGET * size.cost[other]:
            return other, True
        return best, False


@contextmanager
def one_thread() -> Iterator[None]:
    """The calling thread's torch ops on one thread inside the block (restored after): for the
    step's small copies outside the forward pass, where a second thread saves microseconds
    and, while another process holds the other core, costs a time slice at its join (a pool
    load of a rank-8 adapter: 0.07 ms on one thread, 0.22 ms on two beside a busy core)."""
    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads != 1:
            torch.set_num_threads(threads)
