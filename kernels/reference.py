"""Torch references of every op of kernels/ops.py: plain, obviously right, computed in float32.

These are the `reference` backend (kernels/dispatch.py) and the yardstick of the others
(Triton, native C, the torch path). Arguments and layouts: kernels/ops.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from loraserve.kernels.constants import NO_ADAPTER
from loraserve.kernels.ops import (
    AddRMSNorm,
    GatedActivation,
    LoraShrink,
    LoraWeights,
    PagedAttention,
    RopeWriteKV,
    Scores,
    Segments,
    Sequences,
    WriteKV,
)


def adapter_segments(segments: Segments) -> Iterator[tuple[int, int, int]]:
    """(start, end, slot) of every segment that uses an adapter."""
    starts = segments.segment_starts.tolist()
    for index, slot in enumerate(segments.segment_slots.tolist()):
        if slot != NO_ADAPTER and starts[index + 1] > starts[index]:
            yield starts[index], starts[index + 1], slot


def pool_matrix(pool: torch.Tensor, offset: int, rows: int, cols: int) -> torch.Tensor:
    """The `[rows, cols]` matrix stored at element `offset` of the flat pool: a view, no copy."""
    return pool.view(-1)[offset : offset + rows * cols].view(rows, cols)


def lora_shrink(x: torch.Tensor, weights: LoraWeights, segments: Segments) -> torch.Tensor:
    """ops.LoraShrink: y[t, i, :r] = x[t] @ A[slot(t), i].T, for each token t and slice i."""
    num_slices, pool = weights.a_offsets.shape[1], weights.pool
    y = torch.zeros(x.shape[0], num_slices, segments.max_rank, dtype=torch.float32, device=x.device)
    offsets, slot_ranks = weights.a_offsets.tolist(), weights.ranks.tolist()
    for start, end, slot in adapter_segments(segments):
        for index in range(num_slices):
            rank = slot_ranks[slot][index]
            if rank == 0:
                continue
            a = pool_matrix(pool, offsets[slot][index], rank, x.shape[1]).float()  # [rank, in]
            y[start:end, index, :rank] = x[start:end].float() @ a.T
    return y


def lora_expand(
    out: torch.Tensor, y: torch.Tensor, weights: LoraWeights, segments: Segments
) -> None:
    """ops.LoraExpand: out[t, c_i:c_{i+1}] += y[t, i, :r] @ B[slot(t), i], for each token t and slice i
    (DoRA slices: scaled by g, as ops.LoraExpand says)."""
    offsets, slot_ranks = weights.b_offsets.tolist(), weights.ranks.tolist()
    g_offsets = dora_offsets(weights)
    columns = weights.slices.starts
    for start, end, slot in adapter_segments(segments):
        for index in range(weights.b_offsets.shape[1]):
            rank = slot_ranks[slot][index]
            if rank == 0:
                continue
            first, last = columns[index], columns[index + 1]
            b = pool_matrix(weights.pool, offsets[slot][index], rank, last - first).float()
            delta = y[start:end, index, :rank].float() @ b  # b: [rank, out_i]
            if g_offsets[slot][index] < 0:
                out[start:end, first:last] += delta.to(out.dtype)
                continue
            g = pool_matrix(weights.pool, g_offsets[slot][index], 1, last - first).float()
            bias = None if weights.bias is None else weights.bias[first:last]
            out[start:end, first:last] = dora_epilogue(out[start:end, first:last], delta, g, bias)


def dora_offsets(weights: LoraWeights) -> list[list[int]]:
    """g_offsets as lists (every entry -1 when the weights carry no DoRA table)."""
    if weights.g_offsets is None:
        return [[-1] * weights.b_offsets.shape[1]] * weights.b_offsets.shape[0]
    return weights.g_offsets.tolist()


def dora_epilogue(
    base: torch.Tensor, delta: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """DoRA's output in float32, rounded once to base's dtype: PEFT's
    `base + ((g - 1) * (base - bias) + g * delta)`.

    base: [tokens, out_i] (bias included); delta: [tokens, out_i] float32 (y @ B, scaling
    folded in); g: [1, out_i]; bias: [out_i] or None."""
    base32 = base.float()
    without_bias = base32 if bias is None else base32 - bias.float()
    return (base32 + ((g - 1) * without_bias + g * delta)).to(base.dtype)


def write_kv(
    kv: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """ops.WriteKV: kv[s // B, 0, s % B] = key[t]; the same for value at 1; s = slot_mapping[t]."""
    block_size = kv.shape[2]
    pages, positions = slot_mapping // block_size, slot_mapping % block_size
    kv[pages, 0, positions] = key.to(kv.dtype)
    kv[pages, 1, positions] = value.to(kv.dtype)


def paged_attention(
    query: torch.Tensor, kv: torch.Tensor, seqs: Sequences, scores: Scores
) -> torch.Tensor:
    """ops.PagedAttention: out[t] = softmax(cap(q[t] @ K[seq(t), w(t):p(t)+1].T * scale)) @ V[seq(t), w(t):p(t)+1]."""
    block_size, num_kv_heads = kv.shape[2], kv.shape[3]
    group = query.shape[1] // num_kv_heads
    scale, window, softcap = scores.scale, scores.window, scores.softcap
    out = torch.empty_like(query)
    starts, lens = seqs.query_starts.tolist(), seqs.context_lens.tolist()
    for seq, context_len in enumerate(lens):
        q = query[starts[seq] : starts[seq + 1]].float()  # [q_len, heads, head_dim]
        num_blocks = (context_len + block_size - 1) // block_size
        pages = seqs.block_tables[seq, :num_blocks].long()
        gathered = kv[pages].float()  # [blocks, 2, block_size, kv_heads, head_dim]
        gathered = gathered.transpose(0, 1).reshape(2, num_blocks * block_size, num_kv_heads, -1)
        key = gathered[0, :context_len].repeat_interleave(group, dim=1)  # [ctx, heads, dim]
        value = gathered[1, :context_len].repeat_interleave(group, dim=1)
        logits = torch.einsum("qhd,khd->hqk", q, key) * scale  # [heads, q_len, ctx]
        if softcap > 0:
            logits = torch.tanh(logits / softcap) * softcap
        q_pos = torch.arange(context_len - q.shape[0], context_len, device=query.device)
        k_pos = torch.arange(context_len, device=query.device)
        hidden = k_pos[None, :] > q_pos[:, None]  # [q_len, ctx]
        if window > 0:
            hidden |= k_pos[None, :] <= q_pos[:, None] - window
        logits.masked_fill_(hidden[None], float("-inf"))
        probs = logits.softmax(dim=-1)
        out[starts[seq] : starts[seq + 1]] = torch.einsum("hqk,khd->qhd", probs, value).to(
            query.dtype
        )
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """A family's RMSNorm of the last axis, as transformers computes it (ops.AddRMSNorm).

    Llama's (weight of x's dtype): normalize in float32, round, then scale in x's dtype.
    Gemma's (float32 weight, its 1 + w): scale in float32, then round."""
    if x.dtype == torch.float32:  # one call; the same float32 math for both kinds
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype == torch.float32:
        return (x32 * weight).to(x.dtype)
    return weight * x32.to(x.dtype)


def add_rms_norm(
    hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """ops.AddRMSNorm: hidden += delta (in place, unless None); return rms_norm(hidden)."""
    if delta is not None:
        hidden.add_(delta)
    return rms_norm(hidden, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head's first `rotary_dim` dimensions:
    [x1, x2, rest] -> [x1 cos - x2 sin, x2 cos + x1 sin, rest] (rest: partial rotary).

    x: [num_tokens, heads, head_dim]; cos, sin: [num_tokens, 1, rotary_dim // 2] (`angles`)."""
    rotary_dim = 2 * cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    rotated, rest = x.split([rotary_dim, x.shape[-1] - rotary_dim], dim=-1)
    x1, x2 = rotated.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


def angles(cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of ops.RopeWriteKV's `cos_sin` as `rope` takes them: views
    [num_tokens, 1, rotary_dim // 2] each, broadcast over the heads."""
    cos, sin = cos_sin.unsqueeze(1).unbind(2)
    return cos, sin


def rope_write_kv(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos_sin: torch.Tensor,
    kv: torch.Tensor,
    slot_mapping: torch.Tensor,
    write: WriteKV = write_kv,
) -> torch.Tensor:
    """ops.RopeWriteKV: the rotated key and the value into the pool (by `write`, this
    module's write_kv or a backend's); returns rope(query)."""
    cos, sin = angles(cos_sin)
    write(kv, rope(key, cos, sin), value, slot_mapping)
    return rope(query, cos, sin)


def rope_write_kv_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos_sin: torch.Tensor,
    kv: torch.Tensor,
    slot_mapping: torch.Tensor,
    seqs: Sequences,
    scores: Scores,
    rope_write: RopeWriteKV = rope_write_kv,
    attention: PagedAttention = paged_attention,
) -> torch.Tensor:
    """ops.RopeWriteKVAttention: rope_write_kv, then paged_attention of the rotated query, by
    `rope_write` and `attention` (this module's, or a backend's own: the native and torch
    backends compose theirs)."""
    rotated = rope_write(query, key, value, cos_sin, kv, slot_mapping)
    return attention(rotated, kv, seqs, scores)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATION_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,  # SwiGLU: Llama, Mistral, Qwen, Phi-3
    "gelu_pytorch_tanh": _gelu_tanh,  # GeGLU: Gemma
}
"""constants.ACTIVATIONS -> the function (transformers' ACT2FN entry of that name)."""


def gated_activation(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """ops.GatedActivation: act(gate) * up, the activation rounded before the product."""
    gate, up = gate_up.chunk(2, dim=-1)
    return ACTIVATION_FUNCTIONS[activation](gate).mul_(up)


def add_rms_norm_shrink(
    hidden: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    weights: LoraWeights,
    segments: Segments,
    norm: AddRMSNorm = add_rms_norm,
    shrink: LoraShrink = lora_shrink,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ops.AddRMSNormShrink: x = add_rms_norm(...), then lora_shrink(x, ...), by `norm` and
    `shrink` (this module's, or a backend's own: the native and torch backends compose theirs)."""
    x = norm(hidden, delta, weight, eps)
    return x, shrink(x, weights, segments)


def gated_activation_shrink(
    gate_up: torch.Tensor,
    activation: str,
    weights: LoraWeights,
    segments: Segments,
    activate: GatedActivation = gated_activation,
    shrink: LoraShrink = lora_shrink,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ops.GatedActivationShrink: act = gated_activation(...), then lora_shrink(act, ...), by
    `activate` and `shrink` (this module's, or a backend's own)."""
    act = activate(gate_up, activation)
    return act, shrink(act, weights, segments)
