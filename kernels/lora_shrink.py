"""LoRA shrink (SGMV/BGMV): every token times the A matrix of its adapter, all slices in one launch.

Semantics: y[t, i, :r] = x[t] @ A[slot(t), i].T, for each token t and slice i.

Tokens come in segments (runs that share one adapter slot); each (slot, slice)
has its own rank r (1..max_rank, 0 = slice not targeted) and its A (`[r, in_dim]`,
row-major) lives in the unified pool at the element offset `a_offsets[slot, i]`:
the kernel reads it there, no gather copy, and masks rows beyond r, so padded
weights never exist and are never read.

Grid: (tiles, slice x rank block). No split of in_dim, no atomics: every element of y
is one program's sum over in_dim in a fixed order, so the bits are the same run to run,
in a CUDA graph and eagerly; no zeroing launch either, y comes from torch.empty.
- Axis 0: one program per tile of the step's tile map (kernels/lora_tiles.py), up to
  BLOCK_M tokens of ONE segment, read as one row (slot, first, end). The grid is the
  map's `max_tiles`; programs past the device scalar `num_tiles` return at once. Each
  program reads its BLOCK_R rows of A once for all its tokens.
- Axis 1 runs every slice (q/k/v or gate/up) in the same launch, and cuts max_rank
  into BLOCK_R rows of A; a rank block past the tile's rank only stores zeros, as do
  NO_ADAPTER tiles and untargeted slices (the result must be 0 there): no weight read.
- Decode tiles (BLOCK_M = 1, BGMV-style): a matrix-vector product per token with rank
  blocks of 8, so a decode batch of 32 rank-16 adapters runs 2 programs per token and
  slice, each streaming 8 rows of A; prefill tiles (16 or 64 tokens) go through tl.dot
  with rank blocks of 16 (its minimum).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraserve.kernels.checks import FLOAT_DTYPES, check_same_device, check_segments, check_shrink
from loraserve.kernels.constants import NO_ADAPTER
from loraserve.kernels.lora_tiles import DECODE_TILE_TOKENS, TILE_COLUMNS, LoraTiles, tiles_for
from loraserve.kernels.ops import LoraWeights, Segments
from loraserve.kernels.triton_utils import dot_precision

NO_ADAPTER_SLOT: tl.constexpr = tl.constexpr(NO_ADAPTER)
TILE_ROW: tl.constexpr = tl.constexpr(TILE_COLUMNS)
# Decode tiles: 8 rows of A x 512 columns per step, 8 KB of bf16 in flight, 2 programs per
# rank 16 (the fused shrinks run the same blocks one after the other).
DECODE_BLOCK_R, DECODE_BLOCK_K = 8, 512


@triton.jit(
    # Values that change from step to step must not multiply the compiled variants.
    do_not_specialize=["max_rank", "stride_y_token", "stride_y_slice"],
    # Per-layer views of the runner's tables start at any 8-byte boundary.
    do_not_specialize_on_alignment=["a_offsets_ptr", "ranks_ptr"],
)
def _lora_shrink_kernel(
    x_ptr,  # [num_tokens, in_dim] activations
    pool_ptr,  # flat unified pool; A of (slot, slice) starts at a_offsets[slot, slice]
    a_offsets_ptr,  # [num_slots, num_slices] int64 element offsets (a strided view)
    ranks_ptr,  # [num_slots, num_slices] int32 ranks, 0 = slice not targeted
    tiles_ptr,  # [max_tiles, 3] int32 tile map rows: slot, first token, end token
    num_tiles_ptr,  # [1] int32 tiles that hold tokens
    y_ptr,  # [num_tokens, num_slices, max_rank] float32 output
    in_dim,
    max_rank,
    stride_x_token,
    stride_offset_slot,
    stride_offset_slice,
    stride_rank_slot,
    stride_rank_slice,
    stride_y_token,
    stride_y_slice,
    BLOCK_M: tl.constexpr,  # tokens per tile (1: BGMV decode)
    BLOCK_R: tl.constexpr,  # rows of A (rank columns of y) per program
    BLOCK_K: tl.constexpr,  # in_dim step of the reduction loop
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs
):
    tile = tl.program_id(0)
    if tile >= tl.load(num_tiles_ptr):  # past the batch's tiles (a graph's spare programs)
        return
    slot = tl.load(tiles_ptr + tile * TILE_ROW).to(tl.int64)
    tile_start = tl.load(tiles_ptr + tile * TILE_ROW + 1)
    tile_end = tl.load(tiles_ptr + tile * TILE_ROW + 2)
    num_rank_blocks = tl.cdiv(max_rank, BLOCK_R)
    slice_index = tl.program_id(1) // num_rank_blocks
    rank_start = (tl.program_id(1) % num_rank_blocks) * BLOCK_R
    has_adapter = slot != NO_ADAPTER_SLOT
    rank = tl.load(
        ranks_ptr + slot * stride_rank_slot + slice_index * stride_rank_slice,
        mask=has_adapter,
        other=0,
    )
    tokens = (tile_start + tl.arange(0, BLOCK_M)).to(tl.int64)
    token_mask = tokens < tile_end
    columns = rank_start + tl.arange(0, BLOCK_R)
    y_ptrs = y_ptr + tokens[:, None] * stride_y_token + slice_index * stride_y_slice + columns
    y_mask = token_mask[:, None] & (columns < max_rank)[None, :]
    if rank_start >= rank:  # no adapter, slice not targeted, or past this rank
        tl.store(y_ptrs, tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32), mask=y_mask)
        return

    a_offset = tl.load(
        a_offsets_ptr + slot * stride_offset_slot + slice_index * stride_offset_slice
    )
    a_rows = pool_ptr + a_offset + columns.to(tl.int64)[:, None] * in_dim  # row c of A: rank c
    x_rows = x_ptr + tokens[:, None] * stride_x_token
    accumulator = shrink_block(
        x_rows, a_rows, token_mask, columns < rank, in_dim, BLOCK_M, BLOCK_R, BLOCK_K, DOT_PRECISION
    )
    # Columns in [rank, rank_start + BLOCK_R) hold exact zeros (their A rows were masked).
    tl.store(y_ptrs, accumulator, mask=y_mask)


@triton.jit
def shrink_block(
    x_rows,  # [BLOCK_M, 1] pointers to the first element of each token's x
    a_rows,  # [BLOCK_R, 1] pointers to the first element of each row of A
    token_mask,  # [BLOCK_M] tokens of the tile
    a_row_mask,  # [BLOCK_R] rows below the rank
    in_dim,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """[BLOCK_M, BLOCK_R] float32 x @ A.T of one tile and one rank block: in_dim in steps of
    BLOCK_K, each step's products summed, the steps added in order. The one accumulation of
    every shrink (this kernel's and the fused ones', kernels/add_rms_norm_shrink.py and
    gated_activation_shrink.py), so that they agree: bit for bit at the same number of warps,
    to float32 rounding otherwise (the fused norm runs more)."""
    accumulator = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k in range(0, in_dim, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_mask = ks < in_dim
        x = tl.load(x_rows + ks[None, :], mask=token_mask[:, None] & k_mask[None, :], other=0.0)
        a = tl.load(a_rows + ks[None, :], mask=a_row_mask[:, None] & k_mask[None, :], other=0.0)
        if BLOCK_M == 1:  # one token: x [1, BLOCK_K] against every row of A
            accumulator += tl.sum(a.to(tl.float32) * x.to(tl.float32), axis=1)[None, :]
        else:
            accumulator = tl.dot(x, tl.trans(a), accumulator, input_precision=DOT_PRECISION)
    return accumulator


@triton.jit
def shrink_token(
    token,  # int64 index of the token (its row of x and of y)
    x_ptr,  # [num_tokens, in_dim] contiguous activations
    pool_ptr,  # flat unified pool
    a_offsets_ptr,  # [num_slots, num_slices] int64 element offsets
    ranks_ptr,  # [num_slots, num_slices] int32 ranks, 0 = slice not targeted
    tiles_ptr,  # [>= num_tiles, 3] int32 decode tile map: row t is token t's (slot, t, t + 1)
    num_tiles_ptr,  # [1] int32 tiles that hold tokens
    y_ptr,  # [num_tokens, num_slices, max_rank] float32 output
    in_dim,
    max_rank,
    num_slices,
    stride_offset_slot,
    stride_offset_slice,
    stride_rank_slot,
    stride_rank_slice,
    stride_y_token,
    stride_y_slice,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y[token] for every slice of the token's adapter, in one program: the decode shrink's
    rank blocks one after the other, each the same sum as lora_shrink's decode program
    (`shrink_block` with BLOCK_M = 1). Zeros past each rank, for untargeted slices, and for
    tokens past the tile map or of NO_ADAPTER. A decode tile map holds one token per row, in
    token order, so the token's row is its slot's: no search."""
    slot = tl.load(
        tiles_ptr + token * TILE_ROW, mask=token < tl.load(num_tiles_ptr), other=NO_ADAPTER_SLOT
    ).to(tl.int64)
    has_adapter = slot != NO_ADAPTER_SLOT
    token_mask = tl.full([1], 1, tl.int1)
    x_rows = (x_ptr + token * in_dim + tl.zeros([1], dtype=tl.int64))[:, None]
    for slice_index in range(num_slices):
        rank = tl.load(
            ranks_ptr + slot * stride_rank_slot + slice_index * stride_rank_slice,
            mask=has_adapter,
            other=0,
        )
        a_offset = tl.load(
            a_offsets_ptr + slot * stride_offset_slot + slice_index * stride_offset_slice,
            mask=rank > 0,
            other=0,
        )
        y_row = y_ptr + token * stride_y_token + slice_index * stride_y_slice
        for rank_start in range(0, max_rank, BLOCK_R):
            columns = rank_start + tl.arange(0, BLOCK_R)
            accumulator = tl.zeros([1, BLOCK_R], dtype=tl.float32)
            if rank_start < rank:
                a_rows = pool_ptr + a_offset + columns.to(tl.int64)[:, None] * in_dim
                accumulator = shrink_block(
                    x_rows, a_rows, token_mask, columns < rank, in_dim, 1, BLOCK_R, BLOCK_K, "ieee"
                )
            tl.store(y_row + columns[None, :], accumulator, mask=(columns < max_rank)[None, :])


def lora_shrink(
    x: torch.Tensor,
    weights: LoraWeights,
    segments: Segments,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """ops.LoraShrink. x (unit stride along in_dim) and the contiguous pool share a float
    dtype; segments int32 or int64; all on one device. The tile map is the one `segments`
    carries (models.batch.LoraBatch), else one built from them (kernels/lora_tiles.py).

    out: optional [num_tokens, num_slices, max_rank] float32 contiguous buffer for y
    """
    pool, a_offsets, ranks = weights.pool, weights.a_offsets, weights.ranks
    max_rank = segments.max_rank
    check_triton_shrink(x, weights, segments)
    num_tokens, in_dim = x.shape
    num_slices = a_offsets.shape[1]
    shape = (num_tokens, num_slices, max_rank)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=x.device)
    elif out.shape != shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor {shape}, got {out.shape}")
    tiles = tiles_for(segments)
    if out.numel() == 0 or tiles.max_tiles == 0:
        return out
    if tiles.tile_tokens == DECODE_TILE_TOKENS:
        block_r, block_k = DECODE_BLOCK_R, DECODE_BLOCK_K
    else:
        # tl.dot's minimum K is 16; 128 columns = 256 B of bf16 per row and step, coalesced.
        block_r, block_k = 16, 128
    grid = (tiles.max_tiles, num_slices * triton.cdiv(max_rank, block_r))
    _lora_shrink_kernel[grid](
        x,
        pool,
        a_offsets,
        ranks,
        tiles.table,
        tiles.num_tiles,
        out,
        in_dim,
        max_rank,
        x.stride(0),
        a_offsets.stride(0),
        a_offsets.stride(1),
        ranks.stride(0),
        ranks.stride(1),
        out.stride(0),
        out.stride(1),
        BLOCK_M=tiles.tile_tokens,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        DOT_PRECISION=dot_precision(x.dtype),
        num_warps=4,
        num_stages=3,
    )
    return out


def check_triton_shrink(x: torch.Tensor, weights: LoraWeights, segments: Segments) -> None:
    """The Triton shrink's arguments (lora_shrink's, and the fused shrinks' x)."""
    pool, segment_starts, segment_slots = (
        weights.pool,
        segments.segment_starts,
        segments.segment_slots,
    )
    check_same_device(x=x, pool=pool, starts=segment_starts, slots=segment_slots)
    check_shrink(x, weights)
    check_segments(segment_starts, segment_slots)
    if x.dtype != pool.dtype or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x and pool must share a float dtype, got {x.dtype} and {pool.dtype}")
    if not pool.is_contiguous():
        raise ValueError("pool must be contiguous: offsets are flat element offsets")


def token_shrink_arguments(
    weights: LoraWeights, tiles: LoraTiles, y: torch.Tensor
) -> tuple[torch.Tensor | int, ...]:
    """The fused kernels' shrink parameters, pool_ptr to stride_y_slice in `shrink_token`'s
    order, in_dim left out (theirs): y is `[num_tokens, num_slices, max_rank]` float32."""
    a_offsets, ranks = weights.a_offsets, weights.ranks
    return (
        weights.pool,
        a_offsets,
        ranks,
        tiles.table,
        tiles.num_tiles,
        y,
        y.shape[2],
        y.shape[1],
        a_offsets.stride(0),
        a_offsets.stride(1),
        ranks.stride(0),
        ranks.stride(1),
        y.stride(0),
        y.stride(1),
    )
