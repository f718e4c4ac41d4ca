"""The torch path: the semantics of kernels/reference.py in fewer torch calls, for a CPU
where the native kernels (kernels/native.py) cannot be built, or a dtype they do not take.

- LoRA shrink/expand read each adapter's matrices straight from the pool (views, no
  gather copy), one BLAS call per (segment, slice) writing into its place
  (`mm(..., out=)`, `addmm_`). Its cost grows with the number of distinct adapters
  (a Python loop over segments): the native kernels do not have that loop.
- The glue between projections (add + RMSNorm, RoPE with the KV write, the gated
  activation) is the references' own torch code: a few torch calls each; the glue fused
  with a LoRA shrink on Triton is that code, then this path's shrink.
- Decode attention (one query per sequence) runs as a few batched SDPA calls, over
  K/V gathered through the block tables of sequences of similar context length (a
  sliding window is one more mask; soft-capped scores, which SDPA cannot cap, take a
  plain matmul-softmax-matmul instead); prefill and extend sequences go through the
  reference one at a time.

tests/kernels/test_lora_kernels.py and test_attention_kernels.py (`test_cpu_path_*`)
hold these to the references.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraserve.kernels import reference
from loraserve.kernels.ops import LoraWeights, Scores, Segments, SequenceBatch, Sequences
from loraserve.kernels.reference import (
    add_rms_norm,
    gated_activation,
    pool_matrix,
    rope_write_kv,
    write_kv,
)

__all__ = [
    "add_rms_norm",
    "add_rms_norm_shrink",
    "gated_activation",
    "gated_activation_shrink",
    "lora_expand",
    "lora_shrink",
    "paged_attention",
    "rope_write_kv",
    "rope_write_kv_attention",
    "write_kv",
]

MAX_DECODE_GROUPS, MIN_DECODE_GROUP = 4, 32  # decode attention batches (see _context_groups)


def lora_shrink(x: torch.Tensor, weights: LoraWeights, segments: Segments) -> torch.Tensor:
    """ops.LoraShrink: y[t, i, :r] = x[t] @ A[slot(t), i].T."""
    num_slices, pool = weights.a_offsets.shape[1], weights.pool
    y = torch.zeros(x.shape[0], num_slices, segments.max_rank, dtype=torch.float32, device=x.device)
    x = x.float()  # no copy when it already is
    offsets, slot_ranks = weights.a_offsets.tolist(), weights.ranks.tolist()
    for start, end, slot in reference.adapter_segments(segments):
        x_segment = x[start:end]  # [segment_len, in_dim]
        for index, rank in enumerate(slot_ranks[slot]):
            if rank:
                a = pool_matrix(pool, offsets[slot][index], rank, x.shape[1])  # [rank, in]
                torch.mm(x_segment, a.t().float(), out=y[start:end, index, :rank])
    return y


add_rms_norm_shrink = functools.partial(reference.add_rms_norm_shrink, shrink=lora_shrink)
"""ops.AddRMSNormShrink: the reference's norm, then this path's shrink."""

gated_activation_shrink = functools.partial(reference.gated_activation_shrink, shrink=lora_shrink)
"""ops.GatedActivationShrink: the reference's activation, then this path's shrink."""


def lora_expand(
    out: torch.Tensor, y: torch.Tensor, weights: LoraWeights, segments: Segments
) -> None:
    """ops.LoraExpand: out[t, c_i:c_{i+1}] += y[t, i, :r] @ B[slot(t), i] (DoRA slices: scaled by g)."""
    pool, columns = weights.pool, weights.slices.starts
    offsets, slot_ranks = weights.b_offsets.tolist(), weights.ranks.tolist()
    g_offsets = reference.dora_offsets(weights)
    exact_dtype = out.dtype == torch.float32 and pool.dtype == torch.float32
    for start, end, slot in reference.adapter_segments(segments):
        for index, rank in enumerate(slot_ranks[slot]):
            if not rank:
                continue
            first, last = columns[index], columns[index + 1]
            b = pool_matrix(pool, offsets[slot][index], rank, last - first)  # [rank, out_i]
            if g_offsets[slot][index] >= 0:  # DoRA: the delta alone, then g's epilogue
                delta = y[start:end, index, :rank] @ b.float()
                g = pool_matrix(pool, g_offsets[slot][index], 1, last - first).float()
                bias = None if weights.bias is None else weights.bias[first:last]
                base = out[start:end, first:last]
                base.copy_(reference.dora_epilogue(base, delta, g, bias))
            elif exact_dtype:
                out[start:end, first:last].addmm_(y[start:end, index, :rank], b)
            else:  # summed in float32, rounded once, as the reference does
                delta = y[start:end, index, :rank] @ b.float()
                out[start:end, first:last] += delta.to(out.dtype)


def paged_attention(
    query: torch.Tensor, kv: torch.Tensor, seqs: Sequences, scores: Scores
) -> torch.Tensor:
    """ops.PagedAttention: decodes batched by context length, the rest as the reference."""
    plan = _attention_plan(seqs)
    out = torch.empty_like(query)
    for group in plan.decode_groups:
        out[group.tokens] = _decode_attention(query[group.tokens], kv, group, scores)
    for seq, start, end in plan.prefills:
        one = SequenceBatch(
            query_starts=seqs.query_starts.new_tensor([0, end - start]),
            context_lens=seqs.context_lens[seq : seq + 1],
            block_tables=seqs.block_tables[seq : seq + 1],
        )
        out[start:end] = reference.paged_attention(query[start:end], kv, one, scores)
    return out


rope_write_kv_attention = functools.partial(
    reference.rope_write_kv_attention, rope_write=rope_write_kv, attention=paged_attention
)
"""ops.RopeWriteKVAttention: the reference's rope_write_kv, then this path's attention."""


@dataclass(frozen=True)
class _DecodeGroup:
    tokens: torch.Tensor  # [seqs] the one query token of each sequence
    block_tables: torch.Tensor  # [seqs, max_blocks]
    context_lens: torch.Tensor  # [seqs]


@dataclass(frozen=True)
class _AttentionPlan:
    """How one step's sequences split into batched decode groups and single prefills."""

    decode_groups: list[_DecodeGroup]
    prefills: list[tuple[int, int, int]]  # (sequence, first token, end token)


def _attention_plan(seqs: Sequences) -> _AttentionPlan:
    """How this call's sequences split (made per call: this path keeps no state across calls)."""
    query_starts, context_lens = seqs.query_starts, seqs.context_lens
    decoding = (query_starts[1:] - query_starts[:-1]) == 1  # [num_seqs]
    groups = [
        _DecodeGroup(query_starts[rows].long(), seqs.block_tables[rows], context_lens[rows])
        for rows in _context_groups(decoding.nonzero().squeeze(1), context_lens)
    ]
    starts = query_starts.tolist()
    prefills = [
        (seq, starts[seq], starts[seq + 1]) for seq in (~decoding).nonzero().squeeze(1).tolist()
    ]
    return _AttentionPlan(groups, prefills)


def _context_groups(rows: torch.Tensor, context_lens: torch.Tensor) -> list[torch.Tensor]:
    """Decoding sequences `rows`, split into groups of similar context length.

    Each group's K/V is gathered padded to its longest context, and gathering is
    most of the cost: with contexts spread evenly, one group of 256 sequences
    gathers ~1.6x what four groups do. Groups stay large enough (>= 32) that the
    extra calls cost less than the padding they save."""
    if rows.numel() == 0:
        return []
    num_groups = max(1, min(MAX_DECODE_GROUPS, rows.numel() // MIN_DECODE_GROUP))
    by_context = rows[context_lens[rows].argsort()]
    return list(by_context.tensor_split(num_groups))


def _decode_attention(
    query: torch.Tensor, kv: torch.Tensor, group: _DecodeGroup, scores: Scores
) -> torch.Tensor:
    """One query per sequence, these sequences in one batched product.

    query: [num_seqs, num_heads, head_dim]; the group's block_tables: [num_seqs, max_blocks]."""
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = kv.shape[2], kv.shape[3]
    context_lens = group.context_lens
    max_context = int(context_lens.max())
    num_blocks = (max_context + block_size - 1) // block_size
    pages = group.block_tables[:, :num_blocks].long()  # [seqs, blocks]; padding entries are masked
    context = num_blocks * block_size
    # Gathered apart, K and V come out contiguous: [seqs, context, kv_heads, head_dim] views.
    key = kv[pages, 0].view(num_seqs, context, num_kv_heads, head_dim).float()
    value = kv[pages, 1].view(num_seqs, context, num_kv_heads, head_dim).float()
    positions = torch.arange(context, device=query.device)
    valid = positions < context_lens[:, None]  # [seqs, context]
    # Slots past a sequence's end hold whatever the pool held, NaN included: masking
    # their scores is not enough (NaN - inf is NaN, 0 * NaN is NaN), so they are zeroed.
    # Only past the shortest context can a slot be invalid (groups have similar contexts).
    tail = int(context_lens.min())
    for gathered in (key, value):
        gathered[:, tail:].masked_fill_(~valid[:, tail:, None, None], 0.0)
    if scores.window > 0:  # keys before the window hold real K/V: masking them is enough
        valid &= positions >= context_lens[:, None] - scores.window
    dtype, query = query.dtype, query.float().view(num_seqs, num_heads, 1, head_dim)
    key, value = key.transpose(1, 2), value.transpose(1, 2)  # [seqs, kv_heads, context, dim]
    mask = valid[:, None, None, :]  # [seqs, 1, 1, context]
    if scores.softcap > 0:
        out = _capped_attention(query, key, value, mask, scores)
    else:
        out = F.scaled_dot_product_attention(  # [seqs, heads, 1, head_dim]
            query,
            key,
            value,
            attn_mask=mask,
            scale=scores.scale,
            enable_gqa=num_heads != num_kv_heads,  # query head h reads KV head h // group
        )
    return out.reshape(num_seqs, num_heads, head_dim).to(dtype)


def _capped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scores: Scores,
) -> torch.Tensor:
    """SDPA's semantics with soft-capped scores (which SDPA cannot apply), float32.

    query: [seqs, heads, 1, dim]; key, value: [seqs, kv_heads, context, dim];
    mask: [seqs, 1, 1, context] True where visible; returns [seqs, heads, 1, dim]."""
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)  # [seqs, heads, context, dim]
    value = value.repeat_interleave(group, dim=1)
    logits = query @ key.transpose(2, 3) * scores.scale  # [seqs, heads, 1, context]
    logits = torch.tanh(logits / scores.softcap) * scores.softcap
    return logits.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ value
