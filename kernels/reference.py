"""Torch references of every kernel: plain, obviously right, computed in float32.

These are the CPU path of the engine and the yardstick of the Triton kernels.
Layouts shared with the Triton kernels:

- `pool`: the unified page pool, `[num_pages, page_numel]`. An adapter matrix is
  stored row-major as `[rank, dim]` at an element offset into the flat pool: A as
  PEFT writes it (`[r, in]`), B transposed with the LoRA scaling folded in (`[r, out]`).
- `kv_pages`: the pool's KV view, `[num_pages, num_layers, 2, block_size,
  num_kv_heads, head_dim]` (index 0 of the third axis is K, 1 is V).
- Segments: the batch's tokens are grouped into runs that share one adapter:
  `segment_starts` `[num_segments + 1]` token boundaries, `segment_slots`
  `[num_segments]` the adapter slot of each run, or `NO_ADAPTER`.
  Example: slots of 4 requests `[-1, 0, 2, 1]` with 3, 10, 5, 2 tokens ->
  `segment_starts = [0, 3, 13, 18, 20]`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from loraserve.kernels.constants import NO_ADAPTER


def adapter_segments(
    segment_starts: torch.Tensor, segment_slots: torch.Tensor
) -> Iterator[tuple[int, int, int]]:
    """(start, end, slot) of every segment that uses an adapter."""
    starts = segment_starts.tolist()
    for index, slot in enumerate(segment_slots.tolist()):
        if slot != NO_ADAPTER and starts[index + 1] > starts[index]:
            yield starts[index], starts[index + 1], slot


def _matrix(pool: torch.Tensor, offset: int, rank: int, dim: int) -> torch.Tensor:
    """The `[rank, dim]` matrix stored at element `offset` of the flat pool, in float32."""
    return pool.view(-1)[offset : offset + rank * dim].view(rank, dim).float()


def lora_shrink(
    x: torch.Tensor,
    pool: torch.Tensor,
    a_offsets: torch.Tensor,
    ranks: torch.Tensor,
    segment_starts: torch.Tensor,
    segment_slots: torch.Tensor,
    max_rank: int,
) -> torch.Tensor:
    """Semantics: y[t, i, :r] = x[t] @ A[slot(t), i].T, for each token t and slice i.

    x:              [num_tokens, in_dim]
    pool:           [num_pages, page_numel]
    a_offsets:      [num_slots, num_slices] int64, element offset of A (`[r, in_dim]`)
    ranks:          [num_slots, num_slices] int32, 0 where the slice is not targeted
    segment_starts: [num_segments + 1]
    segment_slots:  [num_segments], NO_ADAPTER segments are skipped
    returns y:      [num_tokens, num_slices, max_rank] float32, zero beyond each rank
    """
    num_slices = a_offsets.shape[1]
    y = torch.zeros(x.shape[0], num_slices, max_rank, dtype=torch.float32, device=x.device)
    offsets, slot_ranks = a_offsets.tolist(), ranks.tolist()
    for start, end, slot in adapter_segments(segment_starts, segment_slots):
        for index in range(num_slices):
            rank = slot_ranks[slot][index]
            if rank == 0:
                continue
            a = _matrix(pool, offsets[slot][index], rank, x.shape[1])  # [rank, in_dim]
            y[start:end, index, :rank] = x[start:end].float() @ a.T
    return y


def lora_expand(
    out: torch.Tensor,
    y: torch.Tensor,
    pool: torch.Tensor,
    b_offsets: torch.Tensor,
    ranks: torch.Tensor,
    segment_starts: torch.Tensor,
    segment_slots: torch.Tensor,
    slice_starts: list[int],
) -> None:
    """Semantics: out[t, c_i:c_{i+1}] += y[t, i, :r] @ B[slot(t), i], for each token t and slice i.

    out:            [num_tokens, slice_starts[-1]], updated in place
    y:              [num_tokens, num_slices, max_rank] (from lora_shrink)
    pool:           [num_pages, page_numel]
    b_offsets:      [num_slots, num_slices] int64, element offset of B (`[r, out_i]`, scaled)
    ranks:          [num_slots, num_slices] int32, 0 where the slice is not targeted
    segment_starts: [num_segments + 1]
    segment_slots:  [num_segments], NO_ADAPTER segments are skipped
    slice_starts:   [num_slices + 1] column where each slice's output begins in `out`
    """
    offsets, slot_ranks = b_offsets.tolist(), ranks.tolist()
    for start, end, slot in adapter_segments(segment_starts, segment_slots):
        for index in range(b_offsets.shape[1]):
            rank = slot_ranks[slot][index]
            if rank == 0:
                continue
            first, last = slice_starts[index], slice_starts[index + 1]
            b = _matrix(pool, offsets[slot][index], rank, last - first)  # [rank, out_i]
            delta = y[start:end, index, :rank].float() @ b
            out[start:end, first:last] += delta.to(out.dtype)


def write_kv(
    kv_pages: torch.Tensor,
    layer: int,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Semantics: kv_pages[s // B, layer, 0, s % B] = key[t]; same for value at 1; s = slot_mapping[t].

    kv_pages:     [num_pages, num_layers, 2, block_size, num_kv_heads, head_dim]
    key, value:   [num_tokens, num_kv_heads, head_dim]
    slot_mapping: [num_tokens] int64, page * block_size + position in the page
    """
    block_size = kv_pages.shape[3]
    pages, positions = slot_mapping // block_size, slot_mapping % block_size
    kv_pages[pages, layer, 0, positions] = key.to(kv_pages.dtype)
    kv_pages[pages, layer, 1, positions] = value.to(kv_pages.dtype)


def paged_attention(
    query: torch.Tensor,
    kv_pages: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    query_starts: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Semantics: out[t] = softmax(cap(q[t] @ K[seq(t), w(t):p(t)+1].T * scale)) @ V[seq(t), w(t):p(t)+1].

    Causal attention of each sequence's new tokens over its cached prefix and
    themselves. Sequence s has `context_lens[s]` tokens in the pool (the new ones
    included), the last `q_len = query_starts[s+1] - query_starts[s]` being its
    queries, so query i sits at position p = context_lens[s] - q_len + i.
    Decode is the case q_len = 1. Heads share K/V in groups (GQA).

    Sliding window: with `window` > 0 a query at p sees only the keys at p - window + 1
    .. p (w(t) = max(0, p - window + 1); transformers' `kv_idx > q_idx - sliding_window`);
    0 = every key up to p. Soft-capping: with `softcap` > 0 the scaled scores become
    `softcap * tanh(score / softcap)` before the softmax (Gemma 2); 0 = none.

    query:        [num_tokens, num_heads, head_dim]
    kv_pages:     [num_pages, num_layers, 2, block_size, num_kv_heads, head_dim]
    block_tables: [num_seqs, max_blocks] int32, pages of each sequence in order
    query_starts: [num_seqs + 1]
    context_lens: [num_seqs]
    returns:      [num_tokens, num_heads, head_dim], query's dtype
    """
    block_size, num_kv_heads = kv_pages.shape[3], kv_pages.shape[4]
    group = query.shape[1] // num_kv_heads
    out = torch.empty_like(query)
    starts, lens = query_starts.tolist(), context_lens.tolist()
    for seq, context_len in enumerate(lens):
        q = query[starts[seq] : starts[seq + 1]].float()  # [q_len, heads, head_dim]
        num_blocks = (context_len + block_size - 1) // block_size
        pages = block_tables[seq, :num_blocks].long()
        kv = kv_pages[pages, layer].float()  # [blocks, 2, block_size, kv_heads, head_dim]
        kv = kv.transpose(0, 1).reshape(2, num_blocks * block_size, num_kv_heads, -1)
        key = kv[0, :context_len].repeat_interleave(group, dim=1)  # [ctx, heads, head_dim]
        value = kv[1, :context_len].repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, key) * scale  # [heads, q_len, ctx]
        if softcap > 0:
            scores = torch.tanh(scores / softcap) * softcap
        q_pos = torch.arange(context_len - q.shape[0], context_len, device=query.device)
        k_pos = torch.arange(context_len, device=query.device)
        hidden = k_pos[None, :] > q_pos[:, None]  # [q_len, ctx]
        if window > 0:
            hidden |= k_pos[None, :] <= q_pos[:, None] - window
        scores.masked_fill_(hidden[None], float("-inf"))
        probs = scores.softmax(dim=-1)
        out[starts[seq] : starts[seq + 1]] = torch.einsum("hqk,khd->qhd", probs, value).to(
            query.dtype
        )
    return out
