"""LoRA shrink (SGMV): every token times the A matrix of its adapter, all slices in one launch.

Semantics: y[t, i, :r] = x[t] @ A[slot(t), i].T, for each token t and slice i.

Tokens come in segments (runs that share one adapter slot); each (slot, slice)
has its own rank r (1..max_rank, 0 = slice not targeted) and its A (`[r, in_dim]`,
row-major) lives in the unified pool at the element offset `a_offsets[slot, i]`:
the kernel reads it there, no gather copy, and masks rows beyond r, so padded
weights never exist and are never read.

Grid: (virtual token tiles, slice x rank tile, split of in_dim).
- Axis 0 maps programs to (segment, token tile) without a host sync
  (`triton_utils.segment_tile`): `num_tokens // BLOCK_M + num_segments`
  programs, at most one or two per segment empty. Cost: each program reads
  `segment_starts` once (one vector load for up to 256 segments) before work.
- Axis 1 runs every slice (q/k/v or gate/up) in the same launch, and cuts the
  rank into BLOCK_R columns; a rank tile past the segment's rank only writes zeros.
- Axis 2 splits the reduction over in_dim when the other two axes give too few
  programs to fill the GPU (small decode batches): partial sums are then added
  with float32 atomics into a zeroed y (order of the sum then varies run to run).
NO_ADAPTER segments and untargeted slices cost one program that stores zeros
(the result must be 0 there), and read no weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraserve.kernels.checks import FLOAT_DTYPES, check_same_device, check_segments, check_shrink
from loraserve.kernels.constants import NO_ADAPTER
from loraserve.kernels.ops import LoraWeights, Segments
from loraserve.kernels.triton_utils import (
    dot_precision,
    num_virtual_tiles,
    programs_to_fill,
    search_block,
    segment_tile,
)

NO_ADAPTER_SLOT: tl.constexpr = tl.constexpr(NO_ADAPTER)


@triton.jit
def _lora_shrink_kernel(
    x_ptr,  # [num_tokens, in_dim] activations
    pool_ptr,  # flat unified pool; A of (slot, slice) starts at a_offsets[slot, slice]
    a_offsets_ptr,  # [num_slots, num_slices] int64 element offsets (a strided view)
    ranks_ptr,  # [num_slots, num_slices] int32 ranks, 0 = slice not targeted
    segment_starts_ptr,  # [num_segments + 1] token boundaries
    segment_slots_ptr,  # [num_segments] adapter slot of each segment, or NO_ADAPTER
    y_ptr,  # [num_tokens, num_slices, max_rank] float32 output
    num_segments,
    in_dim,
    max_rank,
    k_per_split,  # in_dim columns each program of axis 2 reduces (a multiple of BLOCK_K)
    stride_x_token,
    stride_offset_slot,
    stride_offset_slice,
    stride_rank_slot,
    stride_rank_slice,
    stride_y_token,
    stride_y_slice,
    BLOCK_M: tl.constexpr,  # tokens per program
    BLOCK_R: tl.constexpr,  # rank columns per program
    BLOCK_K: tl.constexpr,  # in_dim step of the reduction loop
    SEARCH_BLOCK: tl.constexpr,  # see segment_tile
    ATOMIC: tl.constexpr,  # True when in_dim is split: add partial sums into a zeroed y
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs
):
    segment, tile_start, tile_end = segment_tile(
        tl.program_id(0), segment_starts_ptr, num_segments, BLOCK_M, SEARCH_BLOCK
    )
    if tile_start >= tile_end:  # a spare virtual tile
        return
    num_rank_tiles = tl.cdiv(max_rank, BLOCK_R)
    slice_index = tl.program_id(1) // num_rank_tiles
    rank_start = (tl.program_id(1) % num_rank_tiles) * BLOCK_R

    slot = tl.load(segment_slots_ptr + segment).to(tl.int64)
    has_adapter = slot != NO_ADAPTER_SLOT
    rank = tl.load(
        ranks_ptr + slot * stride_rank_slot + slice_index * stride_rank_slice,
        mask=has_adapter,
        other=0,
    )
    tokens = (tile_start + tl.arange(0, BLOCK_M)).to(tl.int64)
    columns = rank_start + tl.arange(0, BLOCK_R)
    y_ptrs = y_ptr + tokens[:, None] * stride_y_token + slice_index * stride_y_slice + columns
    y_mask = (tokens < tile_end)[:, None] & (columns < max_rank)[None, :]
    if rank_start >= rank:  # no adapter, slice not targeted, or past this rank
        if not ATOMIC:
            tl.store(y_ptrs, tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32), mask=y_mask)
        return

    a_offset = tl.load(
        a_offsets_ptr + slot * stride_offset_slot + slice_index * stride_offset_slice
    )
    a_rows = pool_ptr + a_offset + columns.to(tl.int64)[:, None] * in_dim  # row c of A: rank c
    x_rows = x_ptr + tokens[:, None] * stride_x_token
    k_start = tl.program_id(2) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, in_dim)
    accumulator = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_rows + ks[None, :],
            mask=(tokens < tile_end)[:, None] & (ks < k_end)[None, :],
            other=0.0,
        )
        a = tl.load(
            a_rows + ks[None, :], mask=(columns < rank)[:, None] & (ks < k_end)[None, :], other=0.0
        )
        accumulator = tl.dot(x, tl.trans(a), accumulator, input_precision=DOT_PRECISION)
    # Columns in [rank, rank_start + BLOCK_R) hold exact zeros (their A rows were masked).
    if ATOMIC:
        tl.atomic_add(y_ptrs, accumulator, mask=y_mask)
    else:
        tl.store(y_ptrs, accumulator, mask=y_mask)


def lora_shrink(
    x: torch.Tensor,
    weights: LoraWeights,
    segments: Segments,
    *,
    out: torch.Tensor | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """ops.LoraShrink. x (unit stride along in_dim) and the contiguous pool share a float
    dtype; segments int32 or int64; all on one device.

    out:     optional [num_tokens, num_slices, max_rank] float32 contiguous buffer for y
    split_k: programs per (token tile, slice) along in_dim; None picks one
    """
    pool, a_offsets, ranks = weights.pool, weights.a_offsets, weights.ranks
    segment_starts, segment_slots = segments.segment_starts, segments.segment_slots
    max_rank = segments.max_rank
    check_same_device(x=x, pool=pool, starts=segment_starts, slots=segment_slots)
    check_shrink(x, weights)
    check_segments(segment_starts, segment_slots)
    if x.dtype != pool.dtype or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x and pool must share a float dtype, got {x.dtype} and {pool.dtype}")
    if not pool.is_contiguous():
        raise ValueError("pool must be contiguous: offsets are flat element offsets")
    num_tokens, in_dim = x.shape
    num_slices, num_segments = a_offsets.shape[1], segment_slots.shape[0]
    shape = (num_tokens, num_slices, max_rank)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=x.device)
    elif out.shape != shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor {shape}, got {out.shape}")
    if out.numel() == 0:
        return out
    # Segments of a decode batch hold one token or a few: small tiles waste less of
    # the tl.dot minimum (16 rows); prefill segments get 64-token tiles.
    block_m = 16 if num_tokens <= 16 * num_segments else 64
    # Ranks above 64 take two column tiles rather than one large accumulator.
    block_r = min(64, max(16, triton.next_power_of_2(max_rank)))
    block_k = 128  # 256 B of bf16 per row and step: full-width coalesced loads
    num_rank_tiles = triton.cdiv(max_rank, block_r)
    tiles = num_virtual_tiles(num_tokens, num_segments, block_m)
    if split_k is None:
        split_k = triton.cdiv(programs_to_fill(x.device), tiles * num_slices * num_rank_tiles)
    k_blocks = triton.cdiv(in_dim, block_k)
    k_per_split = triton.cdiv(k_blocks, max(1, min(split_k, k_blocks))) * block_k
    split_k = triton.cdiv(in_dim, k_per_split)
    if split_k > 1:
        out.zero_()
    grid = (tiles, num_slices * num_rank_tiles, split_k)
    _lora_shrink_kernel[grid](
        x,
        pool,
        a_offsets,
        ranks,
        segment_starts,
        segment_slots,
        out,
        num_segments,
        in_dim,
        max_rank,
        k_per_split,
        x.stride(0),
        a_offsets.stride(0),
        a_offsets.stride(1),
        ranks.stride(0),
        ranks.stride(1),
        out.stride(0),
        out.stride(1),
        BLOCK_M=block_m,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        SEARCH_BLOCK=search_block(num_segments),
        ATOMIC=split_k > 1,
        DOT_PRECISION=dot_precision(x.dtype),
        num_warps=4,
        num_stages=3,
    )
    return out
