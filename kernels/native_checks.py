"""What the native kernels' wrappers (kernels/native.py) check beyond kernels/checks.py:
float32 CPU tensors and int32 metadata, before any pointer reaches C; and the C kernels'
status codes (native_common.h) turned into the same kind of error."""

from __future__ import annotations

import torch

from loraserve.kernels.checks import check_segments
from loraserve.kernels.constants import NO_ADAPTER
from loraserve.kernels.ops import Segments

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


def segments(segments: Segments) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment_starts, segment_slots) as int32 CPU tensors, checked."""
    starts = int32(segments.segment_starts, "segment_starts")
    slots = int32(segments.segment_slots, "segment_slots")
    check_segments(starts, slots)
    return starts, slots


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
    kv: torch.Tensor,
) -> None:
    if status == STATUS_NO_MEMORY:
        raise MemoryError("the native attention kernel could not allocate its scratch")
    limit = tables.shape[1] * kv.shape[2]
    raise ValueError(
        {
            STATUS_BAD_STARTS: f"query_starts must increase from 0 to num_tokens, got {starts}",
            STATUS_BAD_CONTEXT: "context_lens must be at least each sequence's query tokens and "
            f"at most max_blocks * block_size = {limit}, got {lens} for query_starts {starts}",
            STATUS_BAD_PAGE: f"block_tables must name pages in [0, {kv.shape[0]}) for "
            f"every block of each context, got {tables}",
        }[status]
    )
