"""Paged attention for prefill, extend and decode: causal, GQA, K/V read through block tables.

Semantics: out[t] = softmax(cap(q[t] @ K[seq(t), w(t):p(t)+1].T * scale)) @ V[seq(t), w(t):p(t)+1].

Sequence s has `context_lens[s]` tokens in the pool (its new ones included), the
last `q_len = query_starts[s+1] - query_starts[s]` being its queries, so query i
sits at position p = context_len - q_len + i and sees keys w..p: w = 0, or with a
sliding window W > 0, w = max(0, p - W + 1). With a soft cap c > 0 the scaled scores
become c * tanh(score / c) (Gemma 2). Its K/V live in the pages `block_tables[s]` of
the layer's `kv` view of the pool, read through its strides (its page stride is the
pool's page size, not the KV block's).

One kernel, flash-attention style: a program owns BLOCK_M query rows = up to
BLOCK_M // GROUP tokens x the GROUP query heads that share one KV head (GQA), so
every K/V tile it loads serves GROUP heads; it walks the keys in BLOCK_N steps,
gathering each key's page from the block table, with an online softmax in
float32 (base-2 exponentials, the scale folded into log2(e)).

Grid: (query tiles, KV head, KV partition).
- Decode (as many tokens as sequences): one program per sequence, which loops
  over its query tiles (one, when each sequence brings one token).
- Prefill/extend: (sequence, query tile) pairs found on the device
  (`triton_utils.segment_tile` over query_starts), no host sync.
- Partitions: when (query tiles x KV heads) would not fill the GPU (small decode
  batches, long contexts), the keys are cut into partitions of equal length,
  each program writes an unnormalised partial result, and
  `paged_attention_combine` merges them (flash-decoding). The grid's partition
  count comes from `block_tables.shape[1]` (the padded context: in a CUDA graph,
  the bucket's full width); the partition length from the batch's real longest
  context, a device scalar (`Sequences.max_context_len`), read by every program:
  the keys are spread over as many partitions as they need (each of at least
  `min_partition` keys), and the programs of partitions past them find no key,
  load nothing and leave weight 0 for the combine. No host sync, and one graph
  serves every context length.

With ROPE (decode only, rope_kv_attention.py's launch) the query and the new token's k
and v arrive raw: each program rotates them itself, the first partition writes k and v
into the pool, and the token's own key is taken from registers, never from the pool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from loraserve.kernels.checks import (
    FLOAT_DTYPES,
    check_attention,
    check_same_device,
    check_sequences,
)
from loraserve.kernels.ops import Scores, Sequences
from loraserve.kernels.paged_attention_combine import combine_partitions
from loraserve.kernels.triton_utils import (
    dot_precision,
    num_virtual_tiles,
    programs_to_fill,
    rope_rows,
    search_block,
    segment_tile,
)

MIN_PARTITION = 256  # keys per partition below which splitting costs more than it gains
NO_WINDOW_REACH = 1 << 30  # the reach of a query without a sliding window: every key before it


@triton.jit
def _tanh(x):
    """tanh from exp2, which the interpreter has too (libdevice's tanh it has not): odd, and
    1 - e over 1 + e with e = 2^(-2|x| log2 e) in (0, 1] stays accurate as |x| grows."""
    e = tl.exp2(-2.8853900817779268 * tl.abs(x))  # 2 * log2(e)
    magnitude = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -magnitude, magnitude)


@triton.jit
def _paged_attention_kernel(
    query_ptr,  # [num_tokens, num_heads, head_dim] (ROPE: not yet rotated)
    key_ptr,  # ROPE: [num_tokens, num_kv_heads, head_dim], the new tokens' k, not yet rotated
    value_ptr,  # ROPE: [num_tokens, num_kv_heads, head_dim], the new tokens' v
    cos_sin_ptr,  # ROPE: [num_tokens, 2, half], cos then sin of each token's position
    slot_mapping_ptr,  # ROPE: [num_tokens] int64, where each new token's k/v go; < 0: nowhere
    out_ptr,  # [num_tokens, num_heads, head_dim], written unless SPLIT_KV
    partial_out_ptr,  # [num_splits, num_tokens, num_heads, head_dim] float32 if SPLIT_KV
    partial_max_ptr,  # [num_splits, num_tokens, num_heads] float32 (log2 units)
    partial_sum_ptr,  # [num_splits, num_tokens, num_heads] float32
    kv_ptr,  # one layer's [num_pages, 2, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks] int32 pages of each sequence
    query_starts_ptr,  # [num_seqs + 1] first query token of each sequence
    context_lens_ptr,  # [num_seqs] tokens of each sequence in the pool, new ones included
    max_context_ptr,  # [1] int32, the longest context of the batch (sets the partition length)
    num_seqs,
    num_tokens,
    num_heads,
    head_dim,
    num_splits,  # partitions in the grid: at least as many as the keys need
    min_partition,  # fewest keys worth a partition of their own
    qk_scale,  # scale * log2(e)
    scale,  # the softmax scale (natural units), for SOFTCAP
    softcap,  # scores -> softcap * tanh(score / softcap) when SOFTCAP
    reach,  # keys a query sees, itself included: the sliding window, or NO_WINDOW_REACH
    half,  # ROPE: rotary_dim // 2
    stride_query_token,
    stride_query_head,
    stride_key_token,
    stride_key_head,
    stride_value_token,
    stride_value_head,
    stride_cos_sin_token,
    stride_cos_sin_which,  # between cos and sin
    stride_out_token,
    stride_out_head,
    stride_table_seq,
    stride_table_block,
    stride_kv_page,
    stride_kv_which,  # between K and V
    stride_kv_position,
    stride_kv_head,
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_SIZE: tl.constexpr,  # tokens per KV page
    BLOCK_M: tl.constexpr,  # query rows (tokens x GROUP heads) per program
    BLOCK_N: tl.constexpr,  # keys per step
    BLOCK_D: tl.constexpr,  # power of two >= head_dim
    SEARCH_BLOCK: tl.constexpr,  # see segment_tile
    PER_SEQUENCE: tl.constexpr,  # True: axis 0 is the sequence (decode)
    SPLIT_KV: tl.constexpr,  # True: axis 2 cuts the keys into partitions, write partials
    SOFTCAP: tl.constexpr,  # True: soft-cap the scores
    ROPE: tl.constexpr,  # True (decode only): rotate q and k here, write k/v, attend
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32
):
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP  # query tokens per tile
    if PER_SEQUENCE:
        seq = tl.program_id(0)
        span_start = tl.load(query_starts_ptr + seq)
        span_end = tl.load(query_starts_ptr + seq + 1)
    else:
        seq, span_start, span_end = segment_tile(
            tl.program_id(0), query_starts_ptr, num_seqs, BLOCK_Q, SEARCH_BLOCK
        )
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    first_token = tl.load(query_starts_ptr + seq)
    # Position of the sequence's first query: the queries are its last tokens.
    first_position = tl.load(context_lens_ptr + seq) - (
        tl.load(query_starts_ptr + seq + 1) - first_token
    )
    # Keys per partition, a multiple of BLOCK_N: the batch's keys over the partitions they
    # need; partitions past them find no key.
    max_context = tl.load(max_context_ptr)
    used_splits = tl.maximum(tl.minimum(num_splits, tl.cdiv(max_context, min_partition)), 1)
    partition_size = tl.cdiv(tl.cdiv(max_context, used_splits), BLOCK_N) * BLOCK_N
    table = block_tables_ptr + seq.to(tl.int64) * stride_table_seq
    kv_head_ptr = kv_ptr + kv_head * stride_kv_head
    rows = tl.arange(0, BLOCK_M)  # row = (token of the tile, head of the group)
    heads = kv_head * GROUP + rows % GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim

    # One tile, or none for a spare virtual tile; all of a sequence's tiles in decode.
    for tile_start in range(span_start, span_end, BLOCK_Q):
        tile_end = tl.minimum(tile_start + BLOCK_Q, span_end)
        tokens = (tile_start + rows // GROUP).to(tl.int64)
        row_mask = tokens < tile_end
        positions = first_position + (tokens - first_token)  # [BLOCK_M]
        query_rows = (
            query_ptr + tokens[:, None] * stride_query_token + heads[:, None] * stride_query_head
        )
        query_mask = row_mask[:, None] & dim_mask[None, :]
        if ROPE:  # decode: the tile is the sequence's one token, its rows the GROUP heads
            dtype = out_ptr.dtype.element_ty
            token = first_token.to(tl.int64)  # the tile's one token
            angles = cos_sin_ptr + token * stride_cos_sin_token
            query = rope_rows(
                query_rows, dims[None, :], query_mask, angles, stride_cos_sin_which, half, dtype
            )
            # This KV head's rotated k and v of the token: written to the pool once (by the
            # first partition), and the token's own key everywhere, from registers.
            key_row = key_ptr + token * stride_key_token + kv_head * stride_key_head
            new_key = rope_rows(
                key_row, dims, dim_mask, angles, stride_cos_sin_which, half, dtype
            )  # [BLOCK_D]
            value_row = value_ptr + token * stride_value_token + kv_head * stride_value_head
            new_value = tl.load(value_row + dims, mask=dim_mask, other=0.0)  # [BLOCK_D]
            slot = tl.load(slot_mapping_ptr + token)
            if (split == 0) & (slot >= 0):
                target = (
                    kv_head_ptr
                    + (slot // BLOCK_SIZE) * stride_kv_page
                    + (slot % BLOCK_SIZE) * stride_kv_position
                    + dims
                )
                tl.store(target, new_key, mask=dim_mask)
                tl.store(target + stride_kv_which, new_value, mask=dim_mask)
        else:
            query = tl.load(query_rows + dims[None, :], mask=query_mask, other=0.0)
        # Keys of this partition that any row of the tile may see: from the window of its
        # first row (or the partition's start) up to its last row (causal).
        tile_position = first_position + (tile_start - first_token)
        partition_start = split * partition_size
        key_start = tl.maximum(partition_start, tile_position - reach + 1)
        key_end = tl.minimum(
            partition_start + partition_size, first_position + (tile_end - first_token)
        )
        row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        accumulator = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for block_start in range(key_start, key_end, BLOCK_N):
            keys = block_start + tl.arange(0, BLOCK_N)
            key_mask = keys < key_end
            pages = tl.load(
                table + (keys // BLOCK_SIZE) * stride_table_block, mask=key_mask, other=0
            )
            key_rows = (
                kv_head_ptr
                + pages.to(tl.int64) * stride_kv_page
                + (keys % BLOCK_SIZE) * stride_kv_position
            )
            pool_mask = key_mask
            if ROPE:  # the new token's slot is never read: its write may not have landed
                is_new = key_mask & (keys == tile_position)
                pool_mask = key_mask & (keys != tile_position)
            kv_mask = pool_mask[:, None] & dim_mask[None, :]
            key_tile = tl.load(key_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)  # [N, D]
            value_tile = tl.load(
                key_rows[:, None] + stride_kv_which + dims[None, :], mask=kv_mask, other=0.0
            )
            if ROPE:
                key_tile = tl.where(is_new[:, None], new_key[None, :], key_tile)
                value_tile = tl.where(is_new[:, None], new_value[None, :], value_tile)
            scores = tl.dot(query, tl.trans(key_tile), input_precision=DOT_PRECISION)
            if SOFTCAP:  # in natural units, as the reference, then to log2 units
                scores = _tanh(scores * scale / softcap) * softcap * 1.4426950408889634
            else:
                scores = scores * qk_scale
            visible = key_mask[None, :] & (keys[None, :] <= positions[:, None])
            visible &= keys[None, :] > positions[:, None] - reach
            scores = tl.where(visible, scores, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, axis=1))
            # A row with no visible key yet keeps max -inf; subtract 0 so exp2 gives 0, not NaN.
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            probabilities = tl.exp2(scores - safe_max[:, None])
            rescale = tl.exp2(row_max - safe_max)
            row_sum = row_sum * rescale + tl.sum(probabilities, axis=1)
            accumulator = accumulator * rescale[:, None] + tl.dot(
                probabilities.to(value_tile.dtype), value_tile, input_precision=DOT_PRECISION
            )
            row_max = new_max

        out_mask = row_mask[:, None] & dim_mask[None, :]
        if not SPLIT_KV:
            out = (
                out_ptr
                + tokens[:, None] * stride_out_token
                + heads[:, None] * stride_out_head
                + dims[None, :]
            )
            # Rows past the tile (not stored) may have seen no key in a window: no 0 / 0.
            row_sum = tl.where(row_mask, row_sum, 1.0)
            tl.store(
                out, (accumulator / row_sum[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask
            )
        else:  # unnormalised, with max and sum, for paged_attention_combine
            partial_rows = (split * num_tokens + tokens) * num_heads + heads  # [BLOCK_M] int64
            tl.store(partial_max_ptr + partial_rows, row_max, mask=row_mask)
            tl.store(partial_sum_ptr + partial_rows, row_sum, mask=row_mask)
            partial = partial_out_ptr + partial_rows[:, None] * head_dim + dims[None, :]
            tl.store(partial, accumulator, mask=out_mask)


def paged_attention(
    query: torch.Tensor,
    kv: torch.Tensor,
    seqs: Sequences,
    scores: Scores,
    *,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """ops.PagedAttention. query contiguous, kv of its float dtype (any strides but a unit
    one along head_dim), all on one device.

    out:        optional [num_tokens, num_heads, head_dim] buffer, query's dtype
    num_splits: KV partitions per query tile; None picks enough to fill the GPU
    """
    check_same_device(
        query=query,
        kv=kv,
        tables=seqs.block_tables,
        starts=seqs.query_starts,
        lens=seqs.context_lens,
    )
    check_attention(query, kv)
    check_sequences(seqs.block_tables, seqs.query_starts, seqs.context_lens)
    if not query.is_contiguous() or query.dtype not in FLOAT_DTYPES or kv.dtype != query.dtype:
        raise ValueError(
            f"query must be contiguous and of a float dtype that kv shares, got "
            f"{query.dtype} and kv {kv.dtype}"
        )
    return launch_attention(query, kv, seqs, scores, out, num_splits)


@dataclass(frozen=True)
class NewTokens:
    """A decode step's new tokens, for the kernel to rotate and write itself (ROPE):
    rope_kv_attention.py's arguments, checked there."""

    key: torch.Tensor  # [num_tokens, num_kv_heads, head_dim], not yet rotated
    value: torch.Tensor  # [num_tokens, num_kv_heads, head_dim]
    cos_sin: torch.Tensor  # [num_tokens, 2, rotary_dim // 2]
    slot_mapping: torch.Tensor  # [num_tokens] int64


def launch_attention(
    query: torch.Tensor,
    kv: torch.Tensor,
    seqs: Sequences,
    scores: Scores,
    out: torch.Tensor | None,
    num_splits: int | None,
    new_tokens: NewTokens | None = None,
) -> torch.Tensor:
    """The kernel's launch (and the combine's), on arguments its callers checked: `query`
    rotated already, or, with `new_tokens`, raw (a decode batch: one token per sequence)."""
    num_tokens, num_heads, head_dim = query.shape
    num_seqs, block_size, num_kv_heads = seqs.context_lens.shape[0], kv.shape[2], kv.shape[3]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    elif out.shape != query.shape or out.dtype != query.dtype or out.stride(2) != 1:
        raise ValueError(
            f"out must be {tuple(query.shape)} {query.dtype}, got {out.shape} {out.dtype}"
        )
    if num_tokens == 0:
        return out
    per_sequence = num_tokens == num_seqs  # decode: one token per sequence
    # Decode: the GROUP rows of one token, padded to tl.dot's 16. Prefill: 64 rows,
    # enough to reuse each K/V tile across 64 queries without spilling at head_dim 128.
    block_m = max(16 if per_sequence else 64, triton.next_power_of_2(group))
    block_n = 64  # keys per step: a 16 KB bf16 K tile at head_dim 128
    if per_sequence:
        num_tiles = num_seqs
    else:
        num_tiles = num_virtual_tiles(num_tokens, num_seqs, block_m // group)
    max_keys = seqs.block_tables.shape[1] * block_size
    min_partition = block_n  # as asked
    if num_splits is None:
        wanted = triton.cdiv(programs_to_fill(query.device), num_tiles * num_kv_heads)
        num_splits, min_partition = min(wanted, triton.cdiv(max_keys, MIN_PARTITION)), MIN_PARTITION
    num_splits = max(1, min(num_splits, triton.cdiv(max_keys, block_n)))
    max_context = seqs.max_context_len
    if max_context is None:  # one reduction on the device, no sync
        max_context = seqs.context_lens.max().reshape(1)
    partials = _partials(num_splits, query)
    # Without new tokens their pointers are never read: query stands in for each.
    key, value, cos_sin, slot_mapping = (query, query, query, query)
    if new_tokens is not None:
        key, value = new_tokens.key, new_tokens.value
        cos_sin, slot_mapping = new_tokens.cos_sin, new_tokens.slot_mapping
    scale, softcap, window = scores.scale, scores.softcap, scores.window
    _paged_attention_kernel[(num_tiles, num_kv_heads, num_splits)](
        query,
        key,
        value,
        cos_sin,
        slot_mapping,
        out,
        *partials,
        kv,
        seqs.block_tables,
        seqs.query_starts,
        seqs.context_lens,
        max_context,
        num_seqs,
        num_tokens,
        num_heads,
        head_dim,
        num_splits,
        min_partition,
        scale * math.log2(math.e),
        scale,
        softcap,
        window if window > 0 else NO_WINDOW_REACH,
        cos_sin.shape[2],  # half (ROPE)
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        cos_sin.stride(0),
        cos_sin.stride(1),
        out.stride(0),
        out.stride(1),
        seqs.block_tables.stride(0),
        seqs.block_tables.stride(1),
        kv.stride(0),
        kv.stride(1),
        kv.stride(2),
        kv.stride(3),
        GROUP=group,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(head_dim),
        SEARCH_BLOCK=search_block(num_seqs),
        PER_SEQUENCE=per_sequence,
        SPLIT_KV=num_splits > 1,
        SOFTCAP=softcap > 0,
        ROPE=new_tokens is not None,
        DOT_PRECISION=dot_precision(query.dtype),
        num_warps=4,
        num_stages=2,
    )
    if num_splits > 1:
        combine_partitions(out, *partials)
    return out


def _partials(
    num_splits: int, query: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Buffers of the per-partition results; never written (1-element dummies) when unsplit."""
    if num_splits == 1:
        dummy = torch.empty(1, dtype=torch.float32, device=query.device)
        return dummy, dummy, dummy
    rows = (num_splits, *query.shape[:2])  # [num_splits, num_tokens, num_heads]
    partial_out = torch.empty(*rows, query.shape[2], dtype=torch.float32, device=query.device)
    partial_max = torch.empty(rows, dtype=torch.float32, device=query.device)
    return partial_out, partial_max, torch.empty_like(partial_max)
