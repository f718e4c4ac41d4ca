"""Residual add + RMSNorm fused with the next projection group's LoRA shrink: one launch
where a decode step took two (the norm's and the shrink's).

Semantics (ops.AddRMSNormShrink): hidden += delta (in place, when given);
    x = rms_norm(hidden) * weight                     (kernels/add_rms_norm.py)
    y[t, i, :r] = x[t] @ A[slot(t), i].T              (kernels/lora_shrink.py)
with x rounded to hidden's dtype before the shrink reads it, as the two ops in a row do.

Grid: one program per token, for decode tile maps (one token per tile, tile t = token t,
kernels/lora_tiles.py). The program first does the norm's row exactly as the plain kernel
does (`add_rms_norm_row`, with its warps: the same bits, so a base-model token's x does not
depend on whether its batch holds adapters), stores x, and then, after a barrier so that
every thread sees the whole stored row, runs the decode shrink of that token for every
slice and rank block (`shrink_token`: the BGMV program's sum, BLOCK_K columns at a time in
order, float32; no atomics). x is read back from memory, rounded as the unfused shrink
reads it. What was 3 * cdiv(max_rank, 8) shrink programs per q/k/v token is one program's
loop: fewer launches, less parallelism for a small batch (a GPU timing is still to come).

Other tile maps (prefill and mixed steps: 16- or 64-token tiles) keep the two launches,
add_rms_norm then lora_shrink: their shrink multiplies tiles through tl.dot, which a
program per token cannot, and the launch budget is a decode step's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraserve.kernels.add_rms_norm import (
    add_rms_norm,
    add_rms_norm_row,
    check_add_rms_norm,
    row_warps,
)
from loraserve.kernels.checks import check_same_device
from loraserve.kernels.lora_shrink import (
    DECODE_BLOCK_K,
    DECODE_BLOCK_R,
    check_triton_shrink,
    lora_shrink,
    shrink_token,
    token_shrink_arguments,
)
from loraserve.kernels.lora_tiles import DECODE_TILE_TOKENS, tiles_for
from loraserve.kernels.ops import LoraWeights, Segments


@triton.jit(
    # Values that change from step to step must not multiply the compiled variants.
    do_not_specialize=["max_rank", "stride_y_token", "stride_y_slice"],
    # Per-layer views of the runner's tables start at any 8-byte boundary.
    do_not_specialize_on_alignment=["a_offsets_ptr", "ranks_ptr"],
)
def _add_rms_norm_shrink_kernel(
    hidden_ptr,  # [num_tokens, dim], updated in place when HAS_DELTA
    delta_ptr,  # hidden's shape, or hidden_ptr itself (unread) when not HAS_DELTA
    weight_ptr,  # [dim], hidden's dtype or float32
    out_ptr,  # [num_tokens, dim] contiguous: x, which the shrink reads back
    dim,  # elements of a row (the shrink's in_dim)
    eps,  # added to the mean square
    stride_hidden_token,
    stride_delta_token,
    pool_ptr,  # flat unified pool; A of (slot, slice) starts at a_offsets[slot, slice]
    a_offsets_ptr,  # [num_slots, num_slices] int64 element offsets (a strided view)
    ranks_ptr,  # [num_slots, num_slices] int32 ranks, 0 = slice not targeted
    tiles_ptr,  # [>= num_tiles, 3] int32 decode tile map: row t = (slot of token t, t, t + 1)
    num_tiles_ptr,  # [1] int32 tiles that hold tokens
    y_ptr,  # [num_tokens, num_slices, max_rank] float32 output
    max_rank,
    num_slices,
    stride_offset_slot,
    stride_offset_slice,
    stride_rank_slot,
    stride_rank_slice,
    stride_y_token,
    stride_y_slice,
    HAS_DELTA: tl.constexpr,  # add delta into hidden first
    SCALE_IN_FLOAT32: tl.constexpr,  # Gemma's float32 weight: scale, then round once
    BLOCK_N: tl.constexpr,  # power of two >= dim
    BLOCK_R: tl.constexpr,  # rows of A per step of the shrink
    BLOCK_K: tl.constexpr,  # in_dim step of the shrink's reduction loop
):
    token = tl.program_id(0).to(tl.int64)
    add_rms_norm_row(
        hidden_ptr + token * stride_hidden_token,
        delta_ptr + token * stride_delta_token,
        weight_ptr,
        out_ptr + token * dim,
        dim,
        eps,
        HAS_DELTA,
        SCALE_IN_FLOAT32,
        BLOCK_N,
    )
    tl.debug_barrier()  # the row of x, stored by every thread, is read back by every thread
    shrink_token(
        token,
        out_ptr,
        pool_ptr,
        a_offsets_ptr,
        ranks_ptr,
        tiles_ptr,
        num_tiles_ptr,
        y_ptr,
        dim,
        max_rank,
        num_slices,
        stride_offset_slot,
        stride_offset_slice,
        stride_rank_slot,
        stride_rank_slice,
        stride_y_token,
        stride_y_slice,
        BLOCK_R,
        BLOCK_K,
    )


def add_rms_norm_shrink(
    hidden: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    weights: LoraWeights,
    segments: Segments,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ops.AddRMSNormShrink. hidden `[num_tokens, dim]` (unit column stride), delta, weight
    as add_rms_norm takes them; the pool as lora_shrink takes it (hidden's dtype). One launch
    for a decode tile map (the one `segments` carries, else one built from them), else
    add_rms_norm then lora_shrink."""
    tiles = tiles_for(segments)
    if tiles.tile_tokens != DECODE_TILE_TOKENS or hidden.dim() != 2:
        x = add_rms_norm(hidden, delta, weight, eps)
        return x, lora_shrink(x, weights, segments)
    check_same_device(hidden=hidden, weight=weight, **({} if delta is None else {"delta": delta}))
    check_add_rms_norm(hidden, delta, weight)
    check_triton_shrink(hidden, weights, segments)
    num_tokens, dim = hidden.shape
    x = torch.empty(num_tokens, dim, dtype=hidden.dtype, device=hidden.device)
    y = torch.empty(
        num_tokens,
        weights.a_offsets.shape[1],
        segments.max_rank,
        dtype=torch.float32,
        device=hidden.device,
    )
    if x.numel() == 0 or y.numel() == 0:
        return add_rms_norm(hidden, delta, weight, eps), y
    delta_view = hidden if delta is None else delta
    block_n = triton.next_power_of_2(dim)
    _add_rms_norm_shrink_kernel[(num_tokens,)](
        hidden,
        delta_view,
        weight,
        x,
        dim,
        eps,
        hidden.stride(0),
        delta_view.stride(0),
        *token_shrink_arguments(weights, tiles, y),
        HAS_DELTA=delta is not None,
        SCALE_IN_FLOAT32=weight.dtype == torch.float32,
        BLOCK_N=block_n,
        BLOCK_R=DECODE_BLOCK_R,
        BLOCK_K=DECODE_BLOCK_K,
        num_warps=row_warps(block_n),  # the plain norm's: its sum of squares, its bits
        num_stages=3,
    )
    return x, y
