"""CPU kernel micro-benchmark: the native C kernels vs the torch path vs the references.

    python -m bench.cpu_kernels [--quick] [--threads N] [--output PATH]

Shapes of bench/models.py's `cpu` model, the cpu-s1 and cpu-s2 presets' (hidden 256,
4 heads x 64, MHA, block_size 16, float32) with adapters of ranks 64/32/16/8 in turn on q/k/v/o:

- LoRA shrink and expand of the qkv group (256 -> 3 x 256) and of o (256 -> 256):
  decode batches of 1/16/64/256 tokens (one per request, requests grouped by
  adapter into segments) over 1/16/64 distinct adapters, and prefill batches of
  prompts of PROMPT_TOKENS tokens (each prompt its own adapter, up to the count);
- paged attention: decode batches of 1/16/64/256 sequences (contexts drawn in
  16..128), single prefills of 64..1024 tokens with the C path alone and SDPA
  alone beside the default (where LONG_PREFILL_TOKENS comes from), and a mixed
  step (64 decodes + 2 prefills of 64 tokens).

Each figure is the best of repeated ~10 ms batches, per call, in microseconds, with
warm caches (the same weights each call): the kernel's cost without the stalls a
shared machine adds. "GB/s" counts the bytes that must be read, over the native
time: the distinct adapters' A or B matrices (LoRA), every context's K and V
(attention). Backends: `native` (kernels/native.py), `torch` (kernels/torch_path.py),
`reference` (kernels/reference.py).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from loraserve.kernels import native, reference, torch_path
from loraserve.kernels.ops import LoraWeights, OutputSlices, Scores, SequenceBatch
from loraserve.models.batch import LoraBatch

from .metrics import run_metadata
from .models import SHAPES

MODEL = SHAPES["cpu"]  # the cpu-s1 and cpu-s2 presets' model
HIDDEN, NUM_HEADS, HEAD_DIM, NUM_LAYERS = (
    MODEL.hidden_size,
    MODEL.num_heads,
    MODEL.head_dim,
    MODEL.num_layers,
)
BLOCK_SIZE = 16
RANKS = (64, 32, 16, 8)
LORA_GROUPS = {"qkv": (HIDDEN, (HIDDEN, HIDDEN, HIDDEN)), "o": (HIDDEN, (HIDDEN,))}
ADAPTER_COUNTS, TOKEN_COUNTS = (1, 16, 64), (1, 16, 64, 256)
PROMPT_TOKENS, PREFILL_BATCHES = (
    16,
    ((64, 1), (256, 1), (256, 16), (1024, 64)),
)  # (tokens, adapters)
DECODE_BATCHES, PREFILL_LENGTHS = (1, 16, 64, 256), (64, 128, 256, 512, 1024)
PAGE_NUMEL = NUM_LAYERS * 2 * BLOCK_SIZE * NUM_HEADS * HEAD_DIM  # one KV block, all layers
BACKENDS = {"native": native, "torch": torch_path, "reference": reference}


@dataclass(frozen=True)
class Timing:
    us: dict[str, float]  # backend -> microseconds per call
    bytes_read: int


def time_us(function: Callable[[], object], budget_s: float) -> float:
    """Best microseconds per call over batches of ~10 ms, after a warm-up."""
    for _ in range(3):
        function()
    start = time.perf_counter()
    function()
    per_batch = max(1, int(0.01 / max(time.perf_counter() - start, 1e-7)))
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < 5 or time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(per_batch):
            function()
        samples.append((time.perf_counter() - start) / per_batch * 1e6)
    return min(samples)


class AdapterPool:
    """A pool with `num_adapters` adapters' q/k/v/o of the layer measured, one matrix per page
    (shuffled), and the [slots, modules, 2] offset table and [slots, modules] rank table."""

    def __init__(self, num_adapters: int, generator: torch.Generator) -> None:
        num_pages = num_adapters * 4 * 2
        self.pool = torch.randn(num_pages, PAGE_NUMEL, generator=generator) * 0.05
        pages = iter(torch.randperm(num_pages, generator=generator).tolist())
        self.offsets = torch.zeros(num_adapters, 4, 2, dtype=torch.int64)
        self.ranks = torch.zeros(num_adapters, 4, dtype=torch.int32)
        for slot in range(num_adapters):
            self.ranks[slot] = RANKS[slot % len(RANKS)]
            for module in range(4):
                for which in range(2):
                    self.offsets[slot, module, which] = next(pages) * PAGE_NUMEL


def lora_batch(num_tokens: int, num_adapters: int, prefill: bool) -> tuple[list[int], list[int]]:
    """(segment_starts, segment_slots): decode tokens round-robin over the adapters, grouped;
    prefill prompts of PROMPT_TOKENS tokens, one adapter each."""
    if prefill:
        lengths = [PROMPT_TOKENS] * (num_tokens // PROMPT_TOKENS)
        slots = [index % num_adapters for index in range(len(lengths))]
    else:
        slots = list(range(min(num_adapters, num_tokens)))
        lengths = [len(range(slot, num_tokens, num_adapters)) for slot in slots]
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + length)
    return starts, slots


def lora_timings(
    group: str,
    num_tokens: int,
    num_adapters: int,
    prefill: bool,
    budget_s: float,
    generator: torch.Generator,
) -> Iterator[tuple[str, Timing]]:
    """Shrink and expand of one group, every backend."""
    adapters = AdapterPool(num_adapters, generator)
    in_dim, widths = LORA_GROUPS[group]
    modules = slice(0, 3) if group == "qkv" else slice(3, 4)
    starts_list, slots_list = lora_batch(num_tokens, num_adapters, prefill)
    starts = torch.tensor(starts_list, dtype=torch.int32)
    slots = torch.tensor(slots_list, dtype=torch.int32)
    a_offsets, b_offsets = adapters.offsets[:, modules, 0], adapters.offsets[:, modules, 1]
    ranks, segments = adapters.ranks[:, modules], LoraBatch(starts, slots, max(RANKS))
    slices = OutputSlices.of([0, *torch.tensor(widths).cumsum(0).tolist()], "cpu")
    weights = LoraWeights(adapters.pool, a_offsets, b_offsets, ranks, slices)
    x = torch.randn(num_tokens, in_dim, generator=generator)
    y = reference.lora_shrink(x, weights, segments)
    out = torch.zeros(num_tokens, slices.starts[-1])
    shrink, expand = {}, {}
    for name, kernels in BACKENDS.items():
        shrink_call = partial(kernels.lora_shrink, x, weights, segments)
        expand_call = partial(kernels.lora_expand, out, y, weights, segments)
        shrink[name], expand[name] = time_us(shrink_call, budget_s), time_us(expand_call, budget_s)
    distinct = sorted(set(slots_list))
    a_bytes = int(ranks[distinct].sum()) * in_dim * 4
    b_bytes = sum(int(ranks[distinct, i].sum()) * width * 4 for i, width in enumerate(widths))
    yield "shrink", Timing(shrink, a_bytes)
    yield "expand", Timing(expand, b_bytes)


def attention_timings(
    query_lens: list[int],
    context_lens: list[int],
    backends: dict[str, Callable[..., torch.Tensor]],
    budget_s: float,
    generator: torch.Generator,
) -> Timing:
    """Paged attention of one step's sequences (layer 2 of 4), shuffled pages."""
    blocks = [-(-context // BLOCK_SIZE) for context in context_lens]
    num_pages = sum(blocks) + 1
    pool = torch.randn(num_pages, PAGE_NUMEL, generator=generator)
    kv = pool.view(num_pages, NUM_LAYERS, 2, BLOCK_SIZE, NUM_HEADS, HEAD_DIM)[:, 2]
    pages = torch.randperm(num_pages, generator=generator)
    tables = torch.zeros(len(blocks), max(blocks), dtype=torch.int32)
    used = 0
    for seq, count in enumerate(blocks):
        tables[seq, :count] = pages[used : used + count]
        used += count
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    query = torch.randn(sum(query_lens), NUM_HEADS, HEAD_DIM, generator=generator)
    seqs = SequenceBatch(query_starts=starts, context_lens=lens, block_tables=tables)
    args = (query, kv, seqs, Scores(HEAD_DIM**-0.5))
    us = {name: time_us(partial(function, *args), budget_s) for name, function in backends.items()}
    return Timing(us, sum(context_lens) * 2 * NUM_HEADS * HEAD_DIM * 4)


def native_with_threshold(tokens: int) -> Callable[..., torch.Tensor]:
    """native.paged_attention with LONG_PREFILL_TOKENS set to `tokens` for the call."""

    def call(*args: object) -> torch.Tensor:
        saved, native.LONG_PREFILL_TOKENS = native.LONG_PREFILL_TOKENS, tokens
        try:
            return native.paged_attention(*args)  # type: ignore[arg-type]
        finally:
            native.LONG_PREFILL_TOKENS = saved

    return call


def attention_cases(generator: torch.Generator) -> Iterator[tuple[str, list[int], list[int]]]:
    """(case, query lengths, context lengths)."""
    for batch in DECODE_BATCHES:
        contexts = torch.randint(16, 129, (batch,), generator=generator).tolist()
        yield f"decode {batch} seqs, ctx 16-128", [1] * batch, contexts
    for length in PREFILL_LENGTHS:
        yield f"prefill 1 x {length}", [length], [length]
    contexts = torch.randint(16, 129, (64,), generator=generator).tolist()
    yield "64 decodes + 2 prefills x 64", [*[1] * 64, 64, 64], [*contexts, 64, 64]


def format_row(kernel: str, case: str, timing: Timing) -> str:
    us = timing.us
    gbs = timing.bytes_read / (us["native"] * 1e-6) / 1e9
    speedup = us["torch"] / us["native"]
    cells = "".join(
        f"{us.get(name, float('nan')):>11.1f}" for name in ("native", "torch", "reference")
    )
    extra = "".join(f"  {name} {value:.1f}" for name, value in us.items() if name not in BACKENDS)
    return f"{kernel:<8}{case:<40}{cells}{gbs:>10.2f}{speedup:>9.1f}x{extra}"


HEADER = (
    f"{'kernel':<8}{'case':<40}{'native us':>11}{'torch us':>11}{'ref us':>11}"
    f"{'GB/s':>10}{'vs torch':>10}"
)


def lora_cases() -> Iterator[tuple[str, int, int, bool]]:
    """(group, tokens, adapters, prefill)."""
    for group in LORA_GROUPS:
        for num_adapters in ADAPTER_COUNTS:
            for num_tokens in TOKEN_COUNTS:
                yield group, num_tokens, num_adapters, False
        for num_tokens, num_adapters in PREFILL_BATCHES:
            yield group, num_tokens, num_adapters, True


def run(budget_s: float, generator: torch.Generator) -> Iterator[str]:
    yield HEADER
    for group, num_tokens, num_adapters, prefill in lora_cases():
        kind = f"prefill {PROMPT_TOKENS}-tok prompts" if prefill else "decode"
        case = f"{group} {kind}, {num_tokens} tok, {num_adapters} adapters"
        for kernel, timing in lora_timings(
            group, num_tokens, num_adapters, prefill, budget_s, generator
        ):
            yield format_row(kernel, case, timing)
    backends: dict[str, Callable[..., torch.Tensor]] = {
        "native": native.paged_attention,
        "torch": torch_path.paged_attention,
        "reference": reference.paged_attention,
    }
    for case, query_lens, context_lens in attention_cases(generator):
        extra = {"C-only": native_with_threshold(1 << 30), "SDPA-only": native_with_threshold(0)}
        chosen = backends | extra if max(query_lens) > 1 else backends
        if sum(query_lens) > 512:  # the reference's einsum at 1024 tokens: seconds
            chosen = {name: f for name, f in chosen.items() if name != "reference"}
        yield format_row(
            "attn", case, attention_timings(query_lens, context_lens, chosen, budget_s, generator)
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="shorter timings (noisier)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--output", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    if not native.available():
        print("bench.cpu_kernels needs the native kernels (a C compiler); nothing measured.")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    metadata = run_metadata()
    dirty = " (uncommitted changes)" if metadata["git_dirty"] else ""
    lines = [
        f"# bench.cpu_kernels {metadata['date']} | {metadata['machine']['processor']}"
        f" | torch {metadata['packages']['torch']} | {torch.get_num_threads()} threads"
        f" | git {metadata['git_commit']}{dirty}",
        "# us per call (best of ~10 ms batches, warm caches); GB/s = weights (LoRA) or K/V"
        " (attention) that must be read / native time; vs torch = torch time / native time",
    ]
    for line in lines:
        print(line, flush=True)
    for line in run(0.05 if args.quick else 0.3, torch.Generator().manual_seed(0)):
        print(line, flush=True)
        lines.append(line)
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
