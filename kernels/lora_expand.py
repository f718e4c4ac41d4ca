"""LoRA expand (SGMV/BGMV): add each token's shrunk vector times its adapter's B, all slices in one launch.

Semantics: out[t, c_i:c_{i+1}] += y[t, i, :r] @ B[slot(t), i], for each token t and slice i.

B of (slot, slice i) is `[r, out_i]` row-major (scaling folded in) at the element
offset `b_offsets[slot, i]` of the unified pool, read in place. The rank r is
per (slot, slice): the reduction loop runs `cdiv(r, BLOCK_R)` steps, so a rank-8
segment costs a rank-8 read even when the batch's max_rank is 128, and rows of B
past r are masked, never read.

Grid: (tiles, slice, column block of the widest slice).
- Axis 0: one program per tile of the step's tile map (kernels/lora_tiles.py): up to
  BLOCK_M tokens of one segment, found with one row load (slot, first, end). The grid
  is the map's `max_tiles`; programs past the device scalar `num_tiles`, and NO_ADAPTER
  tiles, return before touching memory, so `out` rows of base-model tokens stay
  bit-identical. Each program reads its column block of B once for all its tokens.
- Axes 1, 2: every slice in the same launch. Slices narrower than the widest
  (k/v beside q under GQA) leave their last column blocks empty: those programs
  return after a few scalar loads.
- Decode tiles (BLOCK_M = 1, BGMV-style): 512 columns per program (16 KB of a rank-16
  bf16 B), a vector-matrix product; prefill tiles (16 or 64 tokens) use tl.dot on 128
  columns. Every element of out is one program's sum in a fixed order: no atomics, the
  same bits run to run and in a CUDA graph.
The sum is computed in float32 (half-precision B goes through tf32 on the
tensor cores) and added to `out` in float32, rounded once to out's dtype.

DoRA (kernels/ops.py): a (slot, slice) whose g offset is >= 0 finishes in the epilogue
with `out + ((g - 1) * (out - bias) + g * acc)`, g read from the pool like a row of B; a
plain slice pays one scalar load (its g offset) for it, and weights without a DoRA table
(`HAS_DORA` false) not even that.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraserve.kernels.checks import FLOAT_DTYPES, check_expand, check_same_device, check_segments
from loraserve.kernels.constants import NO_ADAPTER
from loraserve.kernels.lora_tiles import DECODE_TILE_TOKENS, TILE_COLUMNS, tiles_for
from loraserve.kernels.ops import LoraWeights, Segments
from loraserve.kernels.triton_utils import dot_precision

NO_ADAPTER_SLOT: tl.constexpr = tl.constexpr(NO_ADAPTER)
TILE_ROW: tl.constexpr = tl.constexpr(TILE_COLUMNS)


@triton.jit(
    # y's strides follow the step's max_rank: they must not multiply the compiled variants.
    do_not_specialize=["stride_y_token", "stride_y_slice"],
    # Per-layer views of the runner's tables start at any 8-byte boundary.
    do_not_specialize_on_alignment=["b_offsets_ptr", "ranks_ptr", "g_offsets_ptr"],
)
def _lora_expand_kernel(
    out_ptr,  # [num_tokens, slice_starts[-1]] base layer output, updated in place
    y_ptr,  # [num_tokens, num_slices, max_rank] float32 from lora_shrink
    pool_ptr,  # flat unified pool; B of (slot, slice) starts at b_offsets[slot, slice]
    b_offsets_ptr,  # [num_slots, num_slices] int64 element offsets (a strided view)
    ranks_ptr,  # [num_slots, num_slices] int32 ranks, 0 = slice not targeted
    tiles_ptr,  # [max_tiles, 3] int32 tile map rows: slot, first token, end token
    num_tiles_ptr,  # [1] int32 tiles that hold tokens
    slice_starts_ptr,  # [num_slices + 1] int64 first column of each slice in out
    g_offsets_ptr,  # [num_slots, num_slices] int64 offsets of DoRA's g, -1: plain (HAS_DORA)
    bias_ptr,  # [out_dim] the base projection's bias (HAS_BIAS)
    stride_out_token,
    stride_y_token,
    stride_y_slice,
    stride_offset_slot,
    stride_offset_slice,
    stride_rank_slot,
    stride_rank_slice,
    stride_g_slot,
    stride_g_slice,
    HAS_DORA: tl.constexpr,  # whether g_offsets is a table (else nothing is DoRA)
    HAS_BIAS: tl.constexpr,  # whether bias_ptr is a bias (DoRA subtracts it from out)
    BLOCK_M: tl.constexpr,  # tokens per tile (1: BGMV decode)
    BLOCK_N: tl.constexpr,  # output columns per program
    BLOCK_R: tl.constexpr,  # rank step of the reduction loop
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 weights
):
    tile = tl.program_id(0)
    if tile >= tl.load(num_tiles_ptr):  # past the batch's tiles (a graph's spare programs)
        return
    slot = tl.load(tiles_ptr + tile * TILE_ROW).to(tl.int64)
    if slot == NO_ADAPTER_SLOT:
        return
    tile_start = tl.load(tiles_ptr + tile * TILE_ROW + 1)
    tile_end = tl.load(tiles_ptr + tile * TILE_ROW + 2)
    slice_index = tl.program_id(1)
    rank = tl.load(ranks_ptr + slot * stride_rank_slot + slice_index * stride_rank_slice)
    first_column = tl.load(slice_starts_ptr + slice_index).to(tl.int32)
    end_column = tl.load(slice_starts_ptr + slice_index + 1).to(tl.int32)
    column_start = first_column + tl.program_id(2) * BLOCK_N
    if (rank == 0) | (column_start >= end_column):
        return

    b_offset = tl.load(
        b_offsets_ptr + slot * stride_offset_slot + slice_index * stride_offset_slice
    )
    width = end_column - first_column  # row length of B
    tokens = (tile_start + tl.arange(0, BLOCK_M)).to(tl.int64)
    token_mask = tokens < tile_end
    columns = column_start + tl.arange(0, BLOCK_N)
    column_mask = columns < end_column
    y_rows = y_ptr + tokens[:, None] * stride_y_token + slice_index * stride_y_slice
    b_columns = pool_ptr + b_offset + (columns - first_column)[None, :]
    accumulator = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for rank_start in range(0, rank, BLOCK_R):
        ranks = rank_start + tl.arange(0, BLOCK_R)
        rank_mask = ranks < rank
        y = tl.load(
            y_rows + ranks[None, :], mask=token_mask[:, None] & rank_mask[None, :], other=0.0
        )
        b = tl.load(
            b_columns + ranks.to(tl.int64)[:, None] * width,
            mask=rank_mask[:, None] & column_mask[None, :],
            other=0.0,
        )
        if BLOCK_M == 1:  # one token: y [1, BLOCK_R] against BLOCK_R rows of B
            accumulator += tl.sum(tl.trans(y) * b.to(tl.float32), axis=0)[None, :]
        else:
            accumulator = tl.dot(y, b.to(tl.float32), accumulator, input_precision=DOT_PRECISION)

    out_ptrs = out_ptr + tokens[:, None] * stride_out_token + columns[None, :]
    out_mask = token_mask[:, None] & column_mask[None, :]
    base = tl.load(out_ptrs, mask=out_mask, other=0.0)
    base32 = base.to(tl.float32)
    if HAS_DORA:
        g_offset = tl.load(g_offsets_ptr + slot * stride_g_slot + slice_index * stride_g_slice)
        if g_offset >= 0:
            g = tl.load(
                pool_ptr + g_offset + (columns - first_column), mask=column_mask, other=0.0
            ).to(tl.float32)
            without_bias = base32
            if HAS_BIAS:
                bias = tl.load(bias_ptr + columns, mask=column_mask, other=0.0).to(tl.float32)
                without_bias = base32 - bias[None, :]
            accumulator = (g[None, :] - 1.0) * without_bias + g[None, :] * accumulator
    tl.store(out_ptrs, (base32 + accumulator).to(base.dtype), mask=out_mask)


def lora_expand(
    out: torch.Tensor, y: torch.Tensor, weights: LoraWeights, segments: Segments
) -> None:
    """ops.LoraExpand. out (unit column stride) and the contiguous pool of a float dtype;
    segments int32 or int64; all on one device. The tile map is the one `segments`
    carries (models.batch.LoraBatch), else one built from them (kernels/lora_tiles.py)."""
    pool, b_offsets, ranks, slices = weights.pool, weights.b_offsets, weights.ranks, weights.slices
    segment_starts, segment_slots = segments.segment_starts, segments.segment_slots
    check_same_device(out=out, y=y, pool=pool, starts=segment_starts, slots=segment_slots)
    check_expand(out, y, weights)
    check_segments(segment_starts, segment_slots)
    if out.dtype not in FLOAT_DTYPES or pool.dtype not in FLOAT_DTYPES:
        raise ValueError(f"out and pool must be float tensors, got {out.dtype} and {pool.dtype}")
    if not pool.is_contiguous():
        raise ValueError("pool must be contiguous: offsets are flat element offsets")
    num_tokens, num_slices, max_rank = y.shape
    tiles = tiles_for(segments)
    if num_tokens == 0 or max_rank == 0 or tiles.max_tiles == 0:
        return
    # Decode: 512 columns of B (16 KB at rank 16, bf16) per program; prefill tiles: 128
    # columns (a 256-byte bf16 row segment per load) of 16 or 64 tokens through tl.dot.
    block_n = 512 if tiles.tile_tokens == DECODE_TILE_TOKENS else 128
    block_r = 16  # the rank step (tl.dot's minimum K): one compiled variant for every rank
    g_offsets, bias = weights.g_offsets, weights.bias
    has_dora = g_offsets is not None
    has_bias = has_dora and bias is not None
    if has_dora:
        check_same_device(out=out, g_offsets=g_offsets)
    grid = (
        tiles.max_tiles,
        num_slices,
        triton.cdiv(slices.widest, block_n),
    )
    _lora_expand_kernel[grid](
        out,
        y,
        pool,
        b_offsets,
        ranks,
        tiles.table,
        tiles.num_tiles,
        slices.tensor,
        g_offsets if has_dora else b_offsets,  # any int64 pointer where unused
        bias if has_bias else out,
        out.stride(0),
        y.stride(0),
        y.stride(1),
        b_offsets.stride(0),
        b_offsets.stride(1),
        ranks.stride(0),
        ranks.stride(1),
        g_offsets.stride(0) if has_dora else 0,
        g_offsets.stride(1) if has_dora else 0,
        HAS_DORA=has_dora,
        HAS_BIAS=has_bias,
        BLOCK_M=tiles.tile_tokens,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
        DOT_PRECISION=dot_precision(pool.dtype),
        num_warps=4,
        num_stages=2,
    )
