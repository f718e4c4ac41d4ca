"""The kernel seam: one protocol per op the forward pass calls, and the records they take.

Every backend (kernels/dispatch.py picks one) implements the ops with these signatures:
the LoRA shrink and expand, the KV write and paged attention, and the glue between the
projections that a decode step would otherwise launch as many small kernels (the fused
residual add + RMSNorm, RoPE with the KV write, the gated activation), and that glue with
the next projection group's LoRA shrink (`add_rms_norm_shrink`, `gated_activation_shrink`:
one launch on Triton, the two ops one after the other elsewhere), and a decode step's RoPE
with the KV write and attention (`rope_write_kv_attention`: likewise); kernels/reference.py is
each op's executable definition, the yardstick the other backends are tested against. An
op's arguments come in two kinds: what a layer binds once (`LoraWeights`, `Scores`, its
view of the KV pool) and what a step brings (activations, `Segments`, `Sequences`).

Layouts:
- `pool`: the unified page pool, `[num_pages, page_numel]`. An adapter matrix is
  stored row-major as `[rank, dim]` at an element offset into the flat pool: A as
  PEFT writes it (`[r, in]`), B transposed with the LoRA scaling folded in (`[r, out]`).
- `kv`: one layer's view of the pool's KV pages, `[num_pages, 2, block_size,
  num_kv_heads, head_dim]` (index 0 of the second axis is K, 1 is V): `kv_pages[:, layer]`
  of the 6-D `[num_pages, num_layers, 2, ...]` view, so its page stride is the pool's.
- DoRA: a slice whose `g_offsets` entry is >= 0 has its expand finished with DoRA's
  magnitude scale g = m / ||W + sBA|| (memory/dora.py), one `[out_i]` vector in the pool.
- Segments: the batch's tokens are grouped into runs that share one adapter:
  `segment_starts` `[num_segments + 1]` token boundaries, `segment_slots`
  `[num_segments]` the adapter slot of each run, or `NO_ADAPTER` (skipped).
  Example: slots of 4 requests `[-1, 0, 2, 1]` with 3, 10, 5, 2 tokens ->
  `segment_starts = [0, 3, 13, 18, 20]`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class OutputSlices:
    """Where each slice of a fused projection's output begins (q/k/v: `[0, q, q + kv,
    q + 2 kv]`), made once per projection when the model loads: checked then, never per call.

    Example: `OutputSlices.of([0, 4096, 5120, 6144], device)` -> widest 4096."""

    starts: tuple[int, ...]
    """[num_slices + 1] columns, from 0 to the output's width, increasing."""
    tensor: torch.Tensor
    """The same, int64 on the device the kernels run on (read there by Triton and C)."""
    widest: int
    """Columns of the widest slice (the grid of the Triton expand)."""

    @classmethod
    def of(cls, starts: Sequence[int], device: torch.device | str) -> OutputSlices:
        starts = tuple(int(column) for column in starts)
        widths = [last - first for first, last in itertools.pairwise(starts)]
        if not widths or starts[0] != 0 or min(widths) <= 0:
            raise ValueError(f"slice_starts {starts} must increase from 0 in at least one step")
        return cls(starts, torch.tensor(starts, dtype=torch.int64, device=device), max(widths))


@dataclass(frozen=True)
class LoraWeights:
    """Where every adapter slot's matrices of one fused projection (one layer's q/k/v, o,
    gate/up or down) are: bound once; the pool's table rows change as adapters load."""

    pool: torch.Tensor
    """[num_pages, page_numel], the unified pool."""
    a_offsets: torch.Tensor
    """[num_slots, num_slices] int64, element offset of each A (`[r, in_dim]`); any strides."""
    b_offsets: torch.Tensor
    """[num_slots, num_slices] int64, element offset of each B (`[r, out_i]`, scaled)."""
    ranks: torch.Tensor
    """[num_slots, num_slices] int32, 0 where the slice is not targeted; any strides."""
    slices: OutputSlices
    """Where each slice's output begins in the projection's output (lora_expand's `out`)."""
    g_offsets: torch.Tensor | None = None
    """[num_slots, num_slices] int64, element offset of each DoRA magnitude scale g
    (`[out_i]`, the pool's dtype), -1 where the slice is plain LoRA; None: no DoRA at all."""
    bias: torch.Tensor | None = None
    """[out_dim] the base projection's bias (which DoRA's g does not scale), or None."""


@dataclass(frozen=True)
class Scores:
    """How a layer turns q @ k into attention weights, fixed when the model loads.

    Sliding window: with `window` > 0 a query at position p sees only the keys at
    p - window + 1 .. p (transformers' `kv_idx > q_idx - sliding_window`); 0 = every key
    up to p. Soft-capping: with `softcap` > 0 the scaled scores become
    `softcap * tanh(score / softcap)` before the softmax (Gemma 2); 0 = none."""

    scale: float
    window: int = 0
    softcap: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or self.window < 0:
            raise ValueError(
                f"window must be an int >= 0 (0: no sliding window), got {self.window!r}"
            )
        if not self.softcap >= 0:  # NaN fails too
            raise ValueError(f"softcap must be >= 0 (0: no capping), got {self.softcap!r}")


class Segments(Protocol):
    """A step's tokens as the LoRA ops read them (models.batch.LoraBatch is one)."""

    @property
    def segment_starts(self) -> torch.Tensor:
        """[num_segments + 1] int32, from 0 to num_tokens."""
        ...

    @property
    def segment_slots(self) -> torch.Tensor:
        """[num_segments] int32, the adapter slot of each segment, or NO_ADAPTER."""
        ...

    @property
    def max_rank(self) -> int:
        """At least every rank the batch uses: the width of lora_shrink's y."""
        ...


class Sequences(Protocol):
    """A step's sequences as the attention op reads them (models.batch.ForwardBatch is one).

    Sequence s has `context_lens[s]` tokens in the pool (its new ones included), the last
    `q_len = query_starts[s+1] - query_starts[s]` being its queries, so query i sits at
    position p = context_lens[s] - q_len + i. Decode is the case q_len = 1. Shared by
    the step's layers and never changed in place during the step."""

    @property
    def query_starts(self) -> torch.Tensor:
        """[num_seqs + 1] int32, from 0 to num_tokens."""
        ...

    @property
    def context_lens(self) -> torch.Tensor:
        """[num_seqs] int32, at most max_blocks * block_size."""
        ...

    @property
    def block_tables(self) -> torch.Tensor:
        """[num_seqs, max_blocks] int32, the pages of each sequence in order."""
        ...

    @property
    def max_context_len(self) -> torch.Tensor | None:
        """[1] int32, at least max(context_lens), on their device (the Triton attention's
        partition length; a CUDA graph reads it at replay); None: computed there."""
        ...


@dataclass(frozen=True)
class SequenceBatch:
    """A plain `Sequences` (for one sequence of a step, tests and benchmarks)."""

    query_starts: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    max_context_len: torch.Tensor | None = None


class LoraShrink(Protocol):
    def __call__(self, x: torch.Tensor, weights: LoraWeights, segments: Segments) -> torch.Tensor:
        """Semantics: y[t, i, :r] = x[t] @ A[slot(t), i].T, for each token t and slice i.

        x:         [num_tokens, in_dim], the pool's dtype
        returns y: [num_tokens, num_slices, segments.max_rank] float32, zero beyond each
                   rank and for NO_ADAPTER tokens"""
        ...


class LoraExpand(Protocol):
    def __call__(
        self, out: torch.Tensor, y: torch.Tensor, weights: LoraWeights, segments: Segments
    ) -> None:
        """Semantics: out[t, c_i:c_{i+1}] += y[t, i, :r] @ B[slot(t), i], for each token t and slice i;
        for a DoRA slice (g_offsets >= 0, g = G[slot(t), i]), with base = out[t, c_i:c_{i+1}]:
        out = base + ((g - 1) * (base - bias[c_i:c_{i+1}]) + g * (y[t, i, :r] @ B[slot(t), i])),
        PEFT's `result + (g - 1) * base_result + g * lora_result * scaling` (no bias: 0).

        out: [num_tokens, weights.slices.starts[-1]], updated in place; NO_ADAPTER tokens'
             rows are left untouched (bit for bit). c_i = weights.slices.starts[i].
        y:   [num_tokens, num_slices, max_rank] float32 (from lora_shrink)
        The sum is float32, rounded once to out's dtype."""
        ...


class WriteKV(Protocol):
    def __call__(
        self, kv: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Semantics: kv[s // B, 0, s % B] = key[t]; the same for value at 1; s = slot_mapping[t].

        key, value:   [num_tokens, num_kv_heads, head_dim] (any row stride: views of qkv)
        slot_mapping: [num_tokens] int64, page * block_size + position in the page; the
                      Triton and native kernels skip a slot < 0 (a padding token)"""
        ...


class PagedAttention(Protocol):
    def __call__(
        self, query: torch.Tensor, kv: torch.Tensor, seqs: Sequences, scores: Scores
    ) -> torch.Tensor:
        """Semantics: out[t] = softmax(cap(q[t] @ K[seq(t), w(t):p(t)+1].T * scale)) @ V[seq(t), w(t):p(t)+1].

        Causal attention of each sequence's new tokens over its cached prefix and
        themselves (`Sequences` places them), K/V read through the block tables, within
        the window and soft-capped as `scores` says; heads share K/V in groups (GQA).

        query:   [num_tokens, num_heads, head_dim]
        returns: [num_tokens, num_heads, head_dim], query's dtype"""
        ...


class AddRMSNorm(Protocol):
    def __call__(
        self, hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """Semantics: hidden += delta (in place; skipped when delta is None), then return
        norm(hidden) = h * rsqrt(mean(h ** 2) + eps) * weight per row of the last axis, with
        h = hidden in float32, rounded where transformers rounds:

        - weight of hidden's dtype (Llama's `weight * normed.to(dtype)`): the normed row is
          rounded to hidden's dtype, then scaled in that dtype;
        - float32 weight (Gemma's 1 + w, `(normed * weight).to(dtype)`): scaled in float32,
          then rounded once.
        In float32 the two coincide. The add is rounded to hidden's dtype before the norm.

        hidden:  [num_tokens, dim] or [num_tokens, num_heads, dim] (per-head q/k norms),
                 unit stride on dim; updated in place when delta is given
        delta:   hidden's shape and dtype, or None
        weight:  [dim], hidden's dtype or float32
        returns: hidden's shape (contiguous) and dtype"""
        ...


class RopeWriteKV(Protocol):
    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cos_sin: torch.Tensor,
        kv: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        """Semantics: return rope(query); kv[s // B, 0, s % B] = rope(key[t]) and
        kv[s // B, 1, s % B] = value[t], s = slot_mapping[t], where rope rotates the two
        halves of each head's first rotary_dim dimensions, [x1, x2, rest] ->
        [x1 cos - x2 sin, x2 cos + x1 sin, rest] (rest: partial rotary), each product and
        sum rounded to query's dtype as torch rounds them (transformers' apply_rotary_pos_emb).

        query:        [num_tokens, num_heads, head_dim] (any token and head strides)
        key, value:   [num_tokens, num_kv_heads, head_dim] (any token and head strides)
        cos_sin:      [num_tokens, 2, rotary_dim // 2], each token's cos then sin (query's dtype)
        slot_mapping: [num_tokens] int64 (ops.WriteKV); the Triton and native kernels skip
                      a slot < 0 (a padding token), whose query is still rotated
        returns:      [num_tokens, num_heads, head_dim] contiguous, query's dtype"""
        ...


class RopeWriteKVAttention(Protocol):
    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cos_sin: torch.Tensor,
        kv: torch.Tensor,
        slot_mapping: torch.Tensor,
        seqs: Sequences,
        scores: Scores,
    ) -> torch.Tensor:
        """Semantics: q = rope_write_kv(query, key, value, cos_sin, kv, slot_mapping); return
        paged_attention(q, kv, seqs, scores): RoPE, the KV write and attention of a decode
        batch (every sequence brings one token, num_tokens == num_seqs), as RopeWriteKV and
        PagedAttention define them (one launch on Triton, the two ops elsewhere).

        query, key, value, cos_sin, slot_mapping: as RopeWriteKV takes them (views of qkv);
                 slot_mapping[t] is the slot of the token's position, context_lens[s] - 1
                 (the fused kernel takes the token's own k and v from `key` and `value`,
                 never from that slot), or < 0 for a padding token (not written; its row
                 is never read)
        returns: [num_tokens, num_heads, head_dim], query's dtype"""
        ...


class GatedActivation(Protocol):
    def __call__(self, gate_up: torch.Tensor, activation: str) -> torch.Tensor:
        """Semantics: out = act(gate) * up, gate and up the two halves of gate_up's columns,
        act(gate) rounded to gate_up's dtype before the product (torch's `act(gate).mul_(up)`).

        gate_up:    [num_tokens, 2 * intermediate], unit column stride
        activation: `silu` (SwiGLU) or `gelu_pytorch_tanh` (GeGLU), kernels.constants.ACTIVATIONS
        returns:    [num_tokens, intermediate] contiguous, gate_up's dtype"""
        ...


class AddRMSNormShrink(Protocol):
    def __call__(
        self,
        hidden: torch.Tensor,
        delta: torch.Tensor | None,
        weight: torch.Tensor,
        eps: float,
        weights: LoraWeights,
        segments: Segments,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Semantics: x = add_rms_norm(hidden, delta, weight, eps); y = lora_shrink(x, weights,
        segments); return (x, y): the norm before a projection group and that group's LoRA
        shrink of its output, as AddRMSNorm and LoraShrink define them. x and hidden have
        the bits the two ops give; the shrink reads x as they do, rounded to hidden's dtype.

        hidden:  [num_tokens, in_dim], updated in place when delta is given
        returns: x [num_tokens, in_dim] contiguous, hidden's dtype;
                 y [num_tokens, num_slices, segments.max_rank] float32"""
        ...


class GatedActivationShrink(Protocol):
    def __call__(
        self, gate_up: torch.Tensor, activation: str, weights: LoraWeights, segments: Segments
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Semantics: act = gated_activation(gate_up, activation); y = lora_shrink(act,
        weights, segments); return (act, y): the down projection's input and its LoRA shrink,
        as GatedActivation and LoraShrink define them; act has the bits the two ops give, and
        the shrink reads it as they do, rounded to gate_up's dtype.

        returns: act [num_tokens, intermediate] contiguous, gate_up's dtype;
                 y [num_tokens, num_slices, segments.max_rank] float32"""
        ...


@dataclass(frozen=True)
class Kernels:
    """The kernels the forward pass calls: one backend's implementation of each op."""

    name: str
    lora_shrink: LoraShrink
    lora_expand: LoraExpand
    write_kv: WriteKV
    paged_attention: PagedAttention
    add_rms_norm: AddRMSNorm
    rope_write_kv: RopeWriteKV
    gated_activation: GatedActivation
    add_rms_norm_shrink: AddRMSNormShrink
    gated_activation_shrink: GatedActivationShrink
    rope_write_kv_attention: RopeWriteKVAttention
    reads_tile_map: bool = False
    """Whether the LoRA ops read the step's tile map (`LoraBatch.tiles`, kernels/lora_tiles.py):
    Triton's do; the others read the segments alone, so a runner of theirs builds none."""
