"""RoPE, the KV write and paged attention of a decode step, in one launch.

Semantics (ops.RopeWriteKVAttention): q = rope_write_kv(query, key, value, cos_sin, kv,
slot_mapping); out = paged_attention(q, kv, seqs, scores), for a batch in which every
sequence brings one token (decode), whose slot < 0 (a padding token) is not written.

paged_attention.py's kernel with ROPE on (its launch, `launch_attention`): the grid is
(sequence, KV head, partition) as for any decode batch, and each program

- rotates its GROUP query heads of the sequence's one token in registers, as
  rope_kv_write.py does (the same rounding helper: triton_utils.rope_rotate), partial
  rotary included: the rotated q never goes to memory;
- rotates its KV head's k of that token and loads its v; the program of the first
  partition writes both into the token's slot of the pool (once per KV head: the grid has
  one program per (sequence, KV head, partition));
- attends over the sequence's keys, reading every key but the token's own from the pool
  and that one from its registers.

Race-free in one launch without atomics: the only slot written is the new token's, by one
program, and no program reads it (the token's own sequence takes it from registers; no
other sequence's table holds a page with a slot being written: the prefix cache shares full
pages only, and a graph's padding sequences, context 1 and slot < 0, also read their one
key from registers). The bits equal the two launches': q and k rounded as rope_kv_write
rounds them, the same attention loop over the same values; split-KV partitions and their
combine (paged_attention_combine.py) are unchanged. Prefill keeps the two launches.
"""

from __future__ import annotations

import torch

from loraserve.kernels.checks import (
    check_rope,
    check_same_device,
    check_sequences,
    check_write_kv,
)
from loraserve.kernels.ops import Scores, Sequences
from loraserve.kernels.paged_attention import NewTokens, launch_attention


def rope_write_kv_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos_sin: torch.Tensor,
    kv: torch.Tensor,
    slot_mapping: torch.Tensor,
    seqs: Sequences,
    scores: Scores,
    *,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """ops.RopeWriteKVAttention. query, key, value (any token and head strides: views of
    qkv), cos_sin and kv share a float dtype, unit stride on their last axis; one device.

    out:        optional [num_tokens, num_heads, head_dim] buffer, query's dtype
    num_splits: KV partitions per sequence; None picks enough to fill the GPU"""
    check_same_device(
        query=query,
        key=key,
        value=value,
        cos_sin=cos_sin,
        kv=kv,
        slot_mapping=slot_mapping,
        tables=seqs.block_tables,
        starts=seqs.query_starts,
        lens=seqs.context_lens,
    )
    check_write_kv(kv, key, value, slot_mapping)
    num_tokens = check_rope(query, key, value, cos_sin, kv)[0]
    check_sequences(seqs.block_tables, seqs.query_starts, seqs.context_lens)
    if num_tokens != seqs.context_lens.shape[0]:
        raise ValueError(
            f"rope_write_kv_attention takes decode batches (one token per sequence), got "
            f"{num_tokens} tokens of {seqs.context_lens.shape[0]} sequences"
        )
    new_tokens = NewTokens(key, value, cos_sin, slot_mapping)
    return launch_attention(query, kv, seqs, scores, out, num_splits, new_tokens)
