"""Argument checks of the native kernels' wrappers (kernels/native.py): ValueError with the
bad value and what is allowed, before any pointer reaches C; and the C kernels' status
codes (native_common.h) turned into the same kind of error."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from loraserve.kernels.constants import NO_ADAPTER

# The C kernels' status codes (native_common.h).
STATUS_NO_MEMORY, STATUS_BAD_STARTS, STATUS_BAD_SLOT, STATUS_BAD_RANK = 1, 2, 3, 4
STATUS_BAD_OFFSET, STATUS_BAD_CONTEXT, STATUS_BAD_PAGE = 5, 6, 7


def check_cpu_float32(**tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.dtype != torch.float32 or not tensor.is_cpu:
            raise ValueError(
                f"the native kernels take float32 CPU tensors: {name} is {tensor.dtype} on "
                f"{tensor.device} (use kernel_backend=torch for other dtypes)"
            )


def check_table(offsets: torch.Tensor, ranks: torch.Tensor) -> None:
    """The per-layer views of the adapter offset and rank tables."""
    if offsets.dim() != 2 or offsets.dtype != torch.int64 or not offsets.is_cpu:
        raise ValueError(
            f"offsets must be int64 [num_slots, num_slices] on the CPU, got {offsets.dtype} {offsets.shape}"
        )
    if ranks.shape != offsets.shape or ranks.dtype != torch.int32 or not ranks.is_cpu:
        raise ValueError(
            f"ranks must be int32 {tuple(offsets.shape)} on the CPU, got {ranks.dtype} {ranks.shape}"
        )


def int32(tensor: torch.Tensor, name: str, contiguous: bool = True) -> torch.Tensor:
    """`tensor` as int32 on the CPU (no copy when it already is), contiguous if asked."""
    ready = tensor.dtype is torch.int32 and tensor.is_cpu
    if ready and (not contiguous or tensor.is_contiguous()):
        return tensor  # the engine's case: nothing to do, no torch call
    if not tensor.is_cpu:
        raise ValueError(f"{name} must be on the CPU, got {tensor.device}")
    if tensor.is_floating_point() or tensor.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got {tensor.dtype}")
    tensor = tensor.to(torch.int32)
    return tensor.contiguous() if contiguous else tensor


def segments(starts: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    starts, slots = int32(starts, "segment_starts"), int32(slots, "segment_slots")
    if slots.dim() != 1 or starts.shape != (slots.shape[0] + 1,):
        raise ValueError(
            f"segment_starts must have one more entry than segment_slots, got "
            f"{tuple(starts.shape)} and {tuple(slots.shape)}"
        )
    return starts, slots


SLICE_STARTS: dict[tuple[int, ...], torch.Tensor] = {}  # a handful: q/k/v, o, gate/up, down


def slice_starts(
    slice_starts: Sequence[int] | torch.Tensor, num_slices: int, width: int
) -> torch.Tensor:
    """slice_starts as an int64 tensor, checked: 0 to the width of out, increasing."""
    starts = tuple(
        slice_starts.tolist() if isinstance(slice_starts, torch.Tensor) else slice_starts
    )
    columns = SLICE_STARTS.get(starts)
    if columns is None:
        increasing = all(first < last for first, last in itertools.pairwise(starts))
        if len(starts) != num_slices + 1 or starts[0] != 0 or not increasing:
            raise ValueError(f"slice_starts {starts} must increase from 0 in {num_slices} steps")
        columns = SLICE_STARTS[starts] = torch.tensor(starts, dtype=torch.int64)
    if starts[-1] != width:
        raise ValueError(f"slice_starts {starts} must end at out's width {width}")
    return columns


def check_kv_pages(kv_pages: torch.Tensor, layer: int) -> None:
    if kv_pages.dim() != 6 or kv_pages.stride(5) != 1 or kv_pages.shape[2] != 2:
        raise ValueError(
            "kv_pages must be [num_pages, num_layers, 2, block_size, num_kv_heads, head_dim] "
            f"with unit head_dim stride, got {tuple(kv_pages.shape)}"
        )
    if not 0 <= layer < kv_pages.shape[1]:
        raise ValueError(f"layer must be in [0, {kv_pages.shape[1]}), got {layer}")


def check_window_and_softcap(window: int, softcap: float) -> None:
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0 (0: no sliding window), got {window!r}")
    if not softcap >= 0:  # NaN fails too
        raise ValueError(f"softcap must be >= 0 (0: no capping), got {softcap!r}")


def check_query(query: torch.Tensor, kv_pages: torch.Tensor) -> tuple[int, int, int]:
    if query.dim() != 3 or query.stride(2) != 1:
        raise ValueError(
            f"query must be [num_tokens, num_heads, head_dim], unit stride on head_dim, "
            f"got {tuple(query.shape)}"
        )
    num_tokens, num_heads, head_dim = query.shape
    if head_dim != kv_pages.shape[5] or num_heads % kv_pages.shape[4] != 0:
        raise ValueError(
            f"query heads {tuple(query.shape[1:])} do not match kv_pages {tuple(kv_pages.shape)}: "
            "head_dim must agree and num_heads be a multiple of num_kv_heads"
        )
    return num_tokens, num_heads, head_dim


def raise_lora_error(
    status: int,
    starts: torch.Tensor,
    slots: torch.Tensor,
    offsets: torch.Tensor,
    ranks: torch.Tensor,
    max_rank: int,
    pool: torch.Tensor,
) -> None:
    if status == STATUS_NO_MEMORY:
        raise MemoryError("the native LoRA kernel could not allocate its work list")
    raise ValueError(
        {
            STATUS_BAD_STARTS: f"segment_starts must increase from 0 to num_tokens, got {starts}",
            STATUS_BAD_SLOT: f"segment_slots must be in [0, {offsets.shape[0]}) or NO_ADAPTER "
            f"({NO_ADAPTER}), got {slots}",
            STATUS_BAD_RANK: f"the ranks of the slots used must be in [0, max_rank={max_rank}], "
            f"got {ranks}",
            STATUS_BAD_OFFSET: "every adapter matrix of the slots used must lie inside the pool "
            f"({pool.numel()} elements), got offsets {offsets} and ranks {ranks}",
        }[status]
    )


def raise_attention_error(
    status: int,
    starts: torch.Tensor,
    lens: torch.Tensor,
    tables: torch.Tensor,
    kv_pages: torch.Tensor,
) -> None:
    if status == STATUS_NO_MEMORY:
        raise MemoryError("the native attention kernel could not allocate its scratch")
    limit = tables.shape[1] * kv_pages.shape[3]
    raise ValueError(
        {
            STATUS_BAD_STARTS: f"query_starts must increase from 0 to num_tokens, got {starts}",
            STATUS_BAD_CONTEXT: "context_lens must be at least each sequence's query tokens and "
            f"at most max_blocks * block_size = {limit}, got {lens} for query_starts {starts}",
            STATUS_BAD_PAGE: f"block_tables must name pages in [0, {kv_pages.shape[0]}) for "
            f"every block of each context, got {tables}",
        }[status]
    )
