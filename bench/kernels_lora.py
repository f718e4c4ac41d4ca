"""LoRA shrink + expand of one group (qkv, gate_up, down) at decode and prefill batches:
the Triton kernels against the torch reference and a loop of dense `torch.mm` per adapter
on pre-gathered contiguous A/B (what one would write without SGMV). Run by bench/kernels.py.

Bytes counted are those that must move: LoRA weights once per distinct adapter plus
activations (x, y written and read, out read and written).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from loraserve.kernels.ops import LoraWeights, OutputSlices
from loraserve.models.arch import DOWN_GROUP, GATE_UP_GROUP, LORA_MODULES, QKV_GROUP, ModelArch
from loraserve.models.batch import LoraBatch

from .kernel_timing import DECODE_BATCHES, DTYPE, Result, Timer, make_result

RANK_CHOICES = (8, 16, 32, 64)
ADAPTER_COUNTS = (1, 8, 32, 256)
GROUPS = {"qkv": QKV_GROUP, "gate_up": GATE_UP_GROUP, "down": DOWN_GROUP}
"""The LoRA groups measured (o_proj, hidden -> hidden, is the shape of qkv's q slice)."""


def lora_groups(arch: ModelArch) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Group name -> (input size, output size of each slice)."""
    groups = {}
    for name, modules in GROUPS.items():
        dims = [arch.module_dims(LORA_MODULES[module]) for module in modules]
        groups[name] = (dims[0][0], tuple(out_features for _, out_features in dims))
    return groups


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
    slices: OutputSlices
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
        slices=OutputSlices.of([0, *torch.tensor(widths).cumsum(0).tolist()], "cuda"),
        max_rank=max(adapter_ranks),
        dense=dense,
        weight_bytes=weight_bytes,
    )


def lora_functions(case: LoraCase, decode: bool) -> dict[str, Callable[[], None]]:
    """shrink + expand of one group: Triton, torch reference, and a per-adapter dense loop.
    `decode`: one token per sequence (the kernels' 1-token tiles, as the engine runs it)."""
    from loraserve.kernels import reference
    from loraserve.kernels.lora_expand import lora_expand
    from loraserve.kernels.lora_shrink import lora_shrink
    from loraserve.kernels.lora_tiles import tiles_of

    # The tile map built once, as the engine builds it once per step (not timed).
    tiles = tiles_of(case.segment_starts, case.segment_slots, decode)
    segments = LoraBatch(case.segment_starts, case.segment_slots, case.max_rank, tiles)
    a_offsets, b_offsets = case.offsets[..., 0], case.offsets[..., 1]
    weights = LoraWeights(case.pool, a_offsets, b_offsets, case.ranks, case.slices)

    def triton_op() -> None:
        lora_expand(case.out, lora_shrink(case.x, weights, segments), weights, segments)

    def reference_op() -> None:
        y = reference.lora_shrink(case.x, weights, segments)
        reference.lora_expand(case.out, y, weights, segments)

    bounds = case.segment_starts.tolist()

    def loop_op() -> None:
        for adapter, pairs in enumerate(case.dense):
            tokens = slice(bounds[adapter], bounds[adapter + 1])
            for index, (a_t, b) in enumerate(pairs):
                columns = slice(case.slices.starts[index], case.slices.starts[index + 1])
                case.out[tokens, columns].addmm_(torch.mm(case.x[tokens], a_t), b)

    return {"triton": triton_op, "reference": reference_op, "baseline": loop_op}


def bench_lora(
    model_name: str, model: ModelArch, copy_gbs: float, timer: Timer, quick: bool
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
    for group, (in_dim, widths) in lora_groups(model).items():
        for num_tokens, num_adapters in shapes:
            case = make_lora_case(in_dim, widths, num_tokens, num_adapters)
            times = timer.measure(lora_functions(case, decode=num_tokens in DECODE_BATCHES))
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
