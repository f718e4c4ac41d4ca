"""Tile helpers shared by the Triton kernels: mapping programs to segments' token tiles
(and the RoPE rounding that two kernels share).

Prefill attention runs one program per tile of `BLOCK_M` tokens of one segment (one
sequence's query tokens); the LoRA kernels read a tile map built on the host instead
(kernels/lora_tiles.py). How
many tiles each segment needs is only known on the device, and asking the host
would cost a synchronisation per launch. Instead every launch gets

    num_virtual_tiles = num_tokens // BLOCK_M + num_segments

programs (known from shapes alone), and segment s owns the virtual tiles

    [first(s), first(s + 1)),   first(s) = segment_starts[s] // BLOCK_M + s,

which is at least `cdiv(len(s), BLOCK_M)` of them: the k-th virtual tile of s
covers tokens `start(s) + k * BLOCK_M ...` (segment-relative, so a segment never
pays for a partial tile at its front), and the one or two spare ones are empty
and exit at once. Example, BLOCK_M = 4, segment_starts [0, 3, 13, 18, 20]:
first = [0, 1, 5, 7, 9], so segment 1 (10 tokens) owns virtual tiles 1..4, of
which 1..3 hold tokens 3-6, 7-10, 11-12 and 4 is empty.

Each program finds its segment by counting the segments whose `first` is at
most its tile: one vectorised pass over `segment_starts` (a few hundred bytes
from L2 for a decode batch), no host work and no metadata kernel.
Precondition: `segment_starts[0] == 0` and `segment_starts[-1] == num_tokens`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


def num_virtual_tiles(num_tokens: int, num_segments: int, block_m: int) -> int:
    """Programs along the token axis of a launch: enough for any split into segments."""
    return num_tokens // block_m + num_segments


def search_block(num_segments: int) -> int:
    """Width of the vectorised segment search: one pass for up to 256 segments."""
    return min(256, max(16, triton.next_power_of_2(num_segments)))


@triton.jit
def segment_tile(
    virtual_tile,  # this program's index along the token axis
    segment_starts_ptr,  # [num_segments + 1] token boundaries of the segments
    num_segments,  # number of segments
    BLOCK_M: tl.constexpr,  # tokens per tile
    SEARCH_BLOCK: tl.constexpr,  # segments compared per step of the search
):
    """(segment, first token, end token) of a virtual tile; empty when first >= end."""
    count = tl.zeros([], dtype=tl.int32)
    for chunk in range(0, num_segments, SEARCH_BLOCK):
        segments = chunk + tl.arange(0, SEARCH_BLOCK)
        in_range = segments < num_segments
        starts = tl.load(segment_starts_ptr + segments, mask=in_range, other=0)
        first = starts // BLOCK_M + segments
        count += tl.sum(((first <= virtual_tile) & in_range).to(tl.int32), axis=0)
    segment = tl.maximum(count - 1, 0)
    start = tl.load(segment_starts_ptr + segment)
    end = tl.load(segment_starts_ptr + segment + 1)
    index_in_segment = virtual_tile - (start // BLOCK_M + segment)
    tile_start = start + index_in_segment * BLOCK_M
    tile_end = tl.minimum(tile_start + BLOCK_M, end)
    # Only reachable if segment_starts[0] > 0: tiles before the first segment are empty.
    tile_end = tl.where(index_in_segment >= 0, tile_end, tile_start)
    return segment, tile_start, tile_end


def programs_to_fill(device: torch.device) -> int:
    """Programs a launch needs to keep every multiprocessor busy (0 off CUDA: no splitting)."""
    if device.type != "cuda":
        return 0
    return 2 * _multiprocessor_count(device.index or 0)


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@triton.jit
def rounded(x, DTYPE: tl.constexpr):
    """x (float32) rounded to DTYPE and back: where a torch op in DTYPE rounds."""
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def rope_rotate(x, partner, cos, signed_sin, DTYPE: tl.constexpr):
    """One half of RoPE as transformers' `q * cos + rotate_half(q) * sin` rounds it in DTYPE:
    x cos + partner sin, each product rounded, then the sum (still float32: the caller rounds).

    First half: x = x1, partner = x2, signed_sin = -sin (x1 cos - x2 sin, exactly: rounding
    is symmetric); second half: x = x2, partner = x1, signed_sin = sin. Every kernel that
    rotates (rope_kv_write.py, paged_attention.py) calls this, so they round alike."""
    return rounded(x * cos, DTYPE) + rounded(partner * signed_sin, DTYPE)


@triton.jit
def rope_rows(rows, dims, mask, angles, stride_which, half, DTYPE: tl.constexpr):
    """Rows of head_dim values at `rows` (pointers, broadcast against `dims`) rotated as
    rope_kv_write.py rotates them (`rope_rotate`), rounded to DTYPE; dims past
    rotary_dim = 2 * half are copied, masked elements are 0. `angles`: the token's cos row,
    its sin row `stride_which` further."""
    first = dims < half
    rotary = dims < 2 * half
    partner_dims = tl.where(first, dims + half, dims - half)  # rotate_half's partner
    angle = tl.where(first, dims, dims - half)
    x = tl.load(rows + dims, mask=mask, other=0.0).to(tl.float32)
    partner = tl.load(rows + partner_dims, mask=mask & rotary, other=0.0).to(tl.float32)
    cos = tl.load(angles + angle, mask=rotary, other=0.0).to(tl.float32)
    sin = tl.load(angles + stride_which + angle, mask=rotary, other=0.0).to(tl.float32)
    rotated = rope_rotate(x, partner, cos, tl.where(first, -sin, sin), DTYPE)
    return tl.where(rotary, rotated, x).to(DTYPE)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 operands multiply in full precision (the engine's fp32 path is the
    correctness anchor); half-precision weights go through tf32 when cast up."""
    return "ieee" if dtype == torch.float32 else "tf32"
