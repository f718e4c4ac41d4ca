"""How bench/kernels_lora.py and bench/kernels_attention.py time a kernel and report it.

Device times are medians of CUDA-graph replays (`triton.testing.do_bench_cudagraph`) with
the L2 flushed before each call (the flush's own time subtracted): the kernels' cost
without Python launch overhead. Eager times (`do_bench`) include that overhead; the torch
reference, which syncs, is only timed eagerly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

DTYPE = torch.bfloat16
DECODE_BATCHES = (1, 8, 32, 64, 128, 256)
"""Tokens (LoRA) or sequences (attention) of the decode batches measured."""


@dataclass
class Result:
    kernel: str
    model: str
    shape: str
    time_us: float
    """Device time (CUDA-graph replay, cold L2)."""
    eager_us: float
    """Wall time of an eager call, Python launch overhead included."""
    gigabytes_per_s: float
    copy_fraction: float
    speedup_vs_baseline: float | None
    """Baseline device time / ours."""
    speedup_vs_reference: float | None
    """Reference eager time / ours eager (the reference syncs: no graph)."""
    params: dict[str, Any] = field(default_factory=dict)


class Timer:
    """Device time from CUDA-graph replays (no launch overhead), L2 flushed before each call;
    eager time from `do_bench` (what a caller without graphs waits, launches included).

    do_bench_cudagraph runs on a side stream: inputs made on the default stream must be
    finished first (a block table still being written gives the kernel wild page ids)."""

    def __init__(self, quick: bool) -> None:
        self.rep_ms = 10 if quick else 25
        self.flush = torch.empty(128 * 2**20, dtype=torch.uint8, device="cuda")  # 2x the L2

    def _graph_us(self, fn: Callable[[], object]) -> float:
        import triton.testing

        torch.cuda.synchronize()
        median = triton.testing.do_bench_cudagraph(fn, rep=self.rep_ms, return_mode="median")
        return float(median) * 1e3

    def device_us(self, fn: Callable[[], object], flush_us: float) -> float:
        def flushed() -> None:
            self.flush.zero_()
            fn()

        return max(self._graph_us(flushed) - flush_us, 0.01)

    def eager_us(self, fn: Callable[[], object]) -> float:
        import triton.testing

        torch.cuda.synchronize()
        median = triton.testing.do_bench(fn, warmup=5, rep=self.rep_ms, return_mode="median")
        return float(median) * 1e3

    def measure(self, functions: Mapping[str, Callable[[], object]]) -> dict[str, float]:
        """triton and baseline on the device; triton and the reference (it syncs) eagerly."""
        flush_us = self._graph_us(self.flush.zero_)  # again each time: clocks drift
        times = {name: self.device_us(functions[name], flush_us) for name in ("triton", "baseline")}
        times["triton_eager"] = self.eager_us(functions["triton"])
        if "reference" in functions:
            times["reference_eager"] = self.eager_us(functions["reference"])
        return times


def make_result(
    kernel: str,
    model: str,
    shape: str,
    times: dict[str, float],
    total_bytes: int,
    copy_gbs: float,
    params: dict[str, Any],
) -> Result:
    time_us, eager_us = times["triton"], times["triton_eager"]
    gbs = total_bytes / time_us / 1e3
    baseline = times["baseline"] / time_us
    versus_reference = times["reference_eager"] / eager_us if "reference_eager" in times else None
    params = {**params, "bytes": total_bytes, "times_us": times}
    result = Result(
        kernel,
        model,
        shape,
        time_us,
        eager_us,
        gbs,
        gbs / copy_gbs,
        baseline,
        versus_reference,
        params,
    )
    print_row(result)  # as soon as measured: a run cut short still shows what it got
    return result


HEADER = (
    f"{'kernel':<18} {'model':<10} {'shape':<30} {'us':>8} {'eager':>7} {'GB/s':>6} {'copy':>5} "
    f"{'vs base':>8} {'vs ref':>8}"
)


def print_row(result: Result) -> None:
    base = f"{result.speedup_vs_baseline:.2f}x" if result.speedup_vs_baseline else "-"
    ref = f"{result.speedup_vs_reference:.1f}x" if result.speedup_vs_reference else "-"
    print(
        f"{result.kernel:<18} {result.model:<10} {result.shape:<30} {result.time_us:>8.1f} "
        f"{result.eager_us:>7.1f} {result.gigabytes_per_s:>6.0f} {result.copy_fraction:>5.0%} "
        f"{base:>8} {ref:>8}",
        flush=True,
    )
