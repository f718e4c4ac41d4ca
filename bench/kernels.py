"""Kernel micro-benchmarks: the Triton LoRA and paged attention kernels at 7-8B shapes, bf16.

    python -m bench.kernels [--json PATH] [--quick]

Measures the GPU's device-to-device copy bandwidth first (the ceiling of every
memory-bound kernel here), then for Llama-2-7B and Llama-3-8B shapes:

- LoRA shrink + expand of the qkv, gate_up and down groups at decode batches
  (1..256 tokens, 1..256 distinct adapters, ranks mixed from {8, 16, 32, 64})
  and one prefill batch (8 sequences x 256 tokens, 8 adapters), against the
  torch reference and a loop of dense `torch.mm` per adapter on pre-gathered
  contiguous A/B (what one would write without SGMV);
- paged attention decode at contexts 512/2048/4096 and batches 1..256, and
  prefill, against the torch reference (small cases) and torch's
  `scaled_dot_product_attention` on pre-gathered contiguous K/V.

Bytes counted are those that must move: LoRA weights once per distinct adapter
plus activations (x, y written and read, out read and written); for attention
the K/V of every sequence plus queries and outputs. Device times are medians of
CUDA-graph replays (`triton.testing.do_bench_cudagraph`) with the L2 flushed
before each call (the flush's own time subtracted): the kernels' cost without
Python launch overhead. Eager times (`do_bench`) include that overhead; the
torch reference, which syncs, is only timed eagerly.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

DTYPE = torch.bfloat16
RANK_CHOICES = (8, 16, 32, 64)
DECODE_BATCHES = (1, 8, 32, 64, 128, 256)
ADAPTER_COUNTS = (1, 8, 32, 256)
CONTEXTS = (512, 2048, 4096)
BLOCK_SIZE = 16
REFERENCE_MAX_KEYS = 32768  # the torch attention reference gathers K/V in float32: keep it small


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 128

    def groups(self) -> dict[str, tuple[int, tuple[int, ...]]]:
        """LoRA groups: name -> (input size, output size of each slice)."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        hidden, inter = self.hidden_size, self.intermediate_size
        return {
            "qkv": (hidden, (q, kv, kv)),
            "gate_up": (hidden, (inter, inter)),
            "down": (inter, (hidden,)),
        }


MODELS = {
    "llama2-7b": ModelShape(4096, 11008, 32, 32),
    "llama3-8b": ModelShape(4096, 14336, 32, 8),
}


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


def copy_bandwidth_gbs(timer: Timer) -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second (GB/s).

    Timed eagerly (do_bench clears the L2 itself; launch overhead is nothing at 0.5 ms)."""
    source = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_(0, 255)
    target = torch.empty_like(source)
    time_us = timer.eager_us(lambda: target.copy_(source))
    return 2 * source.numel() / time_us / 1e3


# -- LoRA ------------------------------------------------------------------------------------


@dataclass
class LoraCase:
    """A pool holding the adapters of one group, and a batch of segments."""

    x: torch.Tensor  # [num_tokens, in_dim]
    out: torch.Tensor  # [num_tokens, sum(widths)]
    pool: torch.Tensor  # [num_pages, page_numel]
    offsets: torch.Tensor  # [num_adapters, num_slices, 2] int64
    ranks: torch.Tensor  # [num_adapters, num_slices] int32
    segment_starts: torch.Tensor  # [num_adapters + 1] int32
    segment_slots: torch.Tensor  # [num_adapters] int32
    slice_starts: list[int]
    max_rank: int
    dense: list[list[tuple[torch.Tensor, torch.Tensor]]]  # per adapter, slice: (A.T, B) contiguous
    weight_bytes: int


def make_lora_case(
    in_dim: int, widths: tuple[int, ...], num_tokens: int, num_adapters: int
) -> LoraCase:
    """Each adapter owns one segment of num_tokens / num_adapters tokens; pages shuffled."""
    num_slices = len(widths)
    page_numel = max(RANK_CHOICES) * max(in_dim, *widths)
    num_pages = num_adapters * num_slices * 2
    pool = torch.randn(num_pages, page_numel, device="cuda", dtype=DTYPE) * 0.02
    pages = torch.randperm(num_pages).view(num_adapters, num_slices, 2) * page_numel
    offsets = pages.to("cuda")
    adapter_ranks = [RANK_CHOICES[adapter % len(RANK_CHOICES)] for adapter in range(num_adapters)]
    ranks = (
        torch.tensor(adapter_ranks, dtype=torch.int32)
        .repeat_interleave(num_slices)
        .view(-1, num_slices)
    )
    flat = pool.view(-1)
    dense, weight_bytes = [], 0
    for adapter, rank in enumerate(adapter_ranks):
        pairs = []
        for index, width in enumerate(widths):
            a_start, b_start = int(pages[adapter, index, 0]), int(pages[adapter, index, 1])
            a = flat[a_start : a_start + rank * in_dim].view(rank, in_dim)
            b = flat[b_start : b_start + rank * width].view(rank, width)
            pairs.append((a.t().contiguous(), b.contiguous()))
            weight_bytes += (a.numel() + b.numel()) * pool.element_size()
        dense.append(pairs)
    lengths = [
        num_tokens // num_adapters + (adapter < num_tokens % num_adapters)
        for adapter in range(num_adapters)
    ]
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return LoraCase(
        x=torch.randn(num_tokens, in_dim, device="cuda", dtype=DTYPE),
        out=torch.randn(num_tokens, sum(widths), device="cuda", dtype=DTYPE),
        pool=pool,
        offsets=offsets,
        ranks=ranks.to("cuda"),
        segment_starts=starts.to("cuda"),
        segment_slots=torch.arange(num_adapters, dtype=torch.int32, device="cuda"),
        slice_starts=[0, *torch.tensor(widths).cumsum(0).tolist()],
        max_rank=max(adapter_ranks),
        dense=dense,
        weight_bytes=weight_bytes,
    )


def lora_functions(case: LoraCase) -> dict[str, Callable[[], None]]:
    """shrink + expand of one group: Triton, torch reference, and a per-adapter dense loop."""
    from loraserve.kernels import reference
    from loraserve.kernels.lora_expand import lora_expand
    from loraserve.kernels.lora_shrink import lora_shrink

    segments = (case.segment_starts, case.segment_slots)
    a_offsets, b_offsets = case.offsets[..., 0], case.offsets[..., 1]

    def triton_op() -> None:
        y = lora_shrink(case.x, case.pool, a_offsets, case.ranks, *segments, case.max_rank)
        lora_expand(case.out, y, case.pool, b_offsets, case.ranks, *segments, case.slice_starts)

    def reference_op() -> None:
        y = reference.lora_shrink(
            case.x, case.pool, a_offsets, case.ranks, *segments, case.max_rank
        )
        reference.lora_expand(
            case.out, y, case.pool, b_offsets, case.ranks, *segments, case.slice_starts
        )

    bounds = case.segment_starts.tolist()

    def loop_op() -> None:
        for adapter, pairs in enumerate(case.dense):
            tokens = slice(bounds[adapter], bounds[adapter + 1])
            for index, (a_t, b) in enumerate(pairs):
                columns = slice(case.slice_starts[index], case.slice_starts[index + 1])
                case.out[tokens, columns].addmm_(torch.mm(case.x[tokens], a_t), b)

    return {"triton": triton_op, "reference": reference_op, "baseline": loop_op}


def bench_lora(
    model_name: str, model: ModelShape, copy_gbs: float, timer: Timer, quick: bool
) -> list[Result]:
    shapes = [
        (batch, adapters)
        for batch in DECODE_BATCHES
        for adapters in ADAPTER_COUNTS
        if adapters <= batch
    ]
    shapes.append((8 * 256, 8))  # prefill: 8 sequences of 256 tokens, one adapter each
    if quick:
        shapes = [(1, 1), (64, 8), (256, 256), (2048, 8)]
    results = []
    for group, (in_dim, widths) in model.groups().items():
        for num_tokens, num_adapters in shapes:
            case = make_lora_case(in_dim, widths, num_tokens, num_adapters)
            times = timer.measure(lora_functions(case))
            y_bytes = num_tokens * len(widths) * case.max_rank * 4 * 2  # written, read back
            activation_bytes = (case.x.numel() + 2 * case.out.numel()) * case.x.element_size()
            total_bytes = case.weight_bytes + activation_bytes + y_bytes
            results.append(
                make_result(
                    f"lora-{group}",
                    model_name,
                    f"{num_tokens} tok x {num_adapters} adapters",
                    times,
                    total_bytes,
                    copy_gbs,
                    dict(
                        num_tokens=num_tokens,
                        num_adapters=num_adapters,
                        in_dim=in_dim,
                        widths=widths,
                    ),
                )
            )
            del case
    return results


# -- attention -------------------------------------------------------------------------------


def attention_functions(
    model: ModelShape, query_len: int, context_len: int, num_seqs: int
) -> tuple[dict[str, Callable[[], object]], int]:
    """(Triton / reference / SDPA on gathered K/V, bytes that must move) for equal sequences."""
    import torch.nn.functional as F

    from loraserve.kernels import reference
    from loraserve.kernels.paged_attention import paged_attention

    kv_heads, head_dim = model.num_kv_heads, model.head_dim
    blocks = -(-context_len // BLOCK_SIZE)
    num_pages = num_seqs * blocks
    kv_numel = 2 * BLOCK_SIZE * kv_heads * head_dim
    pool = torch.randn(num_pages, kv_numel + 256, device="cuda", dtype=DTYPE)  # pages wider than KV
    kv_pages = pool[:, :kv_numel].view(num_pages, 1, 2, BLOCK_SIZE, kv_heads, head_dim)
    block_tables = torch.randperm(num_pages, device="cuda").view(num_seqs, blocks).int()
    query = torch.randn(num_seqs * query_len, model.num_heads, head_dim, device="cuda", dtype=DTYPE)
    query_starts = torch.arange(0, num_seqs + 1, dtype=torch.int32, device="cuda") * query_len
    context_lens = torch.full((num_seqs,), context_len, dtype=torch.int32, device="cuda")
    args = (query, kv_pages, 0, block_tables, query_starts, context_lens, head_dim**-0.5)

    gathered = kv_pages[block_tables.long(), 0]  # [seqs, blocks, 2, block_size, kv_heads, head_dim]
    gathered = gathered.permute(2, 0, 4, 1, 3, 5).reshape(2, num_seqs, kv_heads, -1, head_dim)
    key, value = (
        gathered[0, :, :, :context_len].contiguous(),
        gathered[1, :, :, :context_len].contiguous(),
    )
    del gathered
    dense_query = query.view(num_seqs, query_len, model.num_heads, head_dim).transpose(1, 2)
    positions = torch.arange(context_len, device="cuda")
    mask = positions[None, :] <= positions[context_len - query_len :, None]  # [query_len, context]

    functions: dict[str, Callable[[], object]] = {
        "triton": lambda: paged_attention(*args),
        # Decode and plain prefill take SDPA's flash path; extend needs the offset causal mask.
        "baseline": lambda: F.scaled_dot_product_attention(
            dense_query,
            key,
            value,
            attn_mask=mask if 1 < query_len < context_len else None,
            is_causal=1 < query_len == context_len,
            enable_gqa=True,
        ),
    }
    if num_seqs * context_len <= REFERENCE_MAX_KEYS:
        functions["reference"] = lambda: reference.paged_attention(*args)
    kv_bytes = num_seqs * context_len * 2 * kv_heads * head_dim * pool.element_size()
    return functions, kv_bytes + 2 * query.numel() * query.element_size()


def bench_attention(
    model_name: str, model: ModelShape, copy_gbs: float, timer: Timer, quick: bool
) -> list[Result]:
    shapes = [(1, context, batch) for context in CONTEXTS for batch in DECODE_BATCHES]
    shapes += [(256, 256, 8), (512, 2048, 8)]  # prefill 8 x 256; extend 8 x 512 new on 1536 cached
    if quick:
        shapes = [(1, 512, 1), (1, 4096, 256), (256, 256, 8)]
    results = []
    for query_len, context_len, num_seqs in shapes:
        functions, total_bytes = attention_functions(model, query_len, context_len, num_seqs)
        times = timer.measure(functions)
        kind = "decode" if query_len == 1 else "prefill"
        shape = f"{num_seqs} seq x {query_len} q, ctx {context_len}"
        params = dict(num_seqs=num_seqs, query_len=query_len, context_len=context_len)
        results.append(
            make_result(
                f"attention-{kind}", model_name, shape, times, total_bytes, copy_gbs, params
            )
        )
        del functions
    return results


# -- report ----------------------------------------------------------------------------------


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


def git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return done.stdout.strip() or "unknown"


def write_report(path: str, results: list[Result], copy_gbs: float, quick: bool) -> None:
    report = {
        "machine": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "triton": importlib.metadata.version("triton"),
        "dtype": str(DTYPE),
        "copy_bandwidth_gbs": copy_gbs,
        "parameters": dict(
            rank_choices=RANK_CHOICES,
            decode_batches=DECODE_BATCHES,
            adapter_counts=ADAPTER_COUNTS,
            contexts=CONTEXTS,
            block_size=BLOCK_SIZE,
            models={name: asdict(model) for name, model in MODELS.items()},
            quick=quick,
        ),
        "results": [asdict(result) for result in results],
    }
    with open(path, "w") as file:
        json.dump(report, file, indent=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    parser.add_argument("--quick", action="store_true", help="a few shapes only (a smoke run)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.kernels needs a CUDA GPU (the kernels run through Triton); nothing measured.")
        return 0
    torch.manual_seed(0)
    timer = Timer(args.quick)
    copy_gbs = copy_bandwidth_gbs(timer)
    print(
        f"{torch.cuda.get_device_name()}: device-to-device copy {copy_gbs:.0f} GB/s (read + write)"
    )
    print(HEADER + "\n" + "-" * len(HEADER), flush=True)
    results: list[Result] = []
    for model_name, model in MODELS.items():
        results += bench_lora(model_name, model, copy_gbs, timer, args.quick)
        results += bench_attention(model_name, model, copy_gbs, timer, args.quick)
        if args.json:  # after each model: a run cut short keeps what it measured
            write_report(args.json, results, copy_gbs, args.quick)
    print(
        "us: device time (CUDA graph, cold L2); eager: one eager call, launches included.\n"
        "vs base (device times): LoRA, a torch.mm loop per adapter; attention, SDPA on gathered\n"
        "contiguous K/V. vs ref (eager times): the torch reference in kernels/reference.py."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
