"""The memory-bandwidth ceiling every memory-bound figure is compared against: one copy.

bench/kernels.py (each kernel's bytes over its time, as a fraction of this) and
bench/overhead.py (a decode step's bytes at this rate) both use this one measurement,
so that their committed results share one ceiling.
"""

from __future__ import annotations

import statistics
import time

import torch

COPY_BYTES = 2**30
"""1 GiB: far past every cache (a GPU's L2, a server CPU's L3), so memory is what is timed."""


def copy_bandwidth(device: torch.device | str, numel: int = COPY_BYTES) -> float:
    """Bytes read + written per second by a copy of `numel` bytes within `device`'s memory.

    The median of 5 timed batches of 3 copies each, after a warm-up copy; a batch is timed
    from one synchronisation to the next, so a launch's cost is spread over its copies."""
    device = torch.device(device)
    source = torch.empty(numel, dtype=torch.uint8, device=device).random_(0, 255)
    target = torch.empty_like(source)
    copies_per_batch = 3
    target.copy_(source)
    seconds = []
    for _ in range(5):
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(copies_per_batch):
            target.copy_(source)
        _synchronize(device)
        seconds.append((time.perf_counter() - start) / copies_per_batch)
    return 2 * numel / statistics.median(seconds)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
