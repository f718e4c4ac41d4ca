"""The decoder forward pass of every supported family over a flat token batch.

Llama 1/2/3, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 and Phi-3 share one layer: norm,
q/k/v projection, RoPE, paged attention, o projection, residual, norm, gated MLP,
residual. A family only switches pieces of it on, from its ModelArch
(models/families.py says which): per-head q/k norms (Qwen3, Gemma 3), Gemma's (1 + w)
norms around the attention and MLP outputs, GeGLU, scaled embeddings, its attention
scale, soft-capped attention scores and logits, sliding-window layers with their own
RoPE base (Gemma 3), partial rotary (Phi-4-mini), checkpoints with fused q/k/v and
gate/up (Phi-3). Every choice is made once per layer at load time, never per batch.

Every sequence's new tokens are concatenated into one batch; attention reads each
sequence's K/V out of the unified pool through its block table, and LoRA adds each
segment's adapter delta through the SGMV kernels. q/k/v and gate/up run as one
fused matmul each, their LoRA as slices of one shrink/expand launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraserve.kernels.dispatch import Kernels
from loraserve.models.arch import DOWN, GATE_UP, O_PROJ, QKV, ModelArch
from loraserve.models.batch import ForwardBatch, LoraBatch
from loraserve.models.layers import (
    ACTIVATION_FUNCTIONS,
    RMSNorm,
    apply_rope,
    embedding_scale,
    rope_tables,
    softcap,
)


@dataclass
class LayerWeights:
    """One decoder layer's weights, q/k/v and gate/up fused, norms ready for `RMSNorm`."""

    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [q_size + 2 * kv_size, hidden]
    qkv_bias: torch.Tensor | None  # [q_size + 2 * kv_size]
    o: torch.Tensor  # [hidden, q_size]
    o_bias: torch.Tensor | None  # [hidden]
    post_norm: torch.Tensor  # [hidden], before the MLP (Gemma's pre_feedforward_layernorm)
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor  # [hidden, intermediate]
    q_norm: torch.Tensor | None = None  # [head_dim] (Qwen3, Gemma 3)
    k_norm: torch.Tensor | None = None  # [head_dim]
    attention_out_norm: torch.Tensor | None = None  # [hidden], Gemma's post_attention_layernorm
    mlp_out_norm: torch.Tensor | None = None  # [hidden], Gemma's post_feedforward_layernorm
    window: int = 0
    """The layer's sliding window, 0 for full attention."""
    rope: int = 0
    """Which of the model's cos/sin tables the layer rotates with (1: Gemma 3's local one)."""


def fuse_layer(
    weights: dict[str, torch.Tensor], layer: int, arch: ModelArch, norm: RMSNorm
) -> LayerWeights:
    """Take one layer's tensors out of the checkpoint dict, fusing q/k/v and gate/up."""
    prefix = f"model.layers.{layer}."
    attn, mlp = prefix + "self_attn.", prefix + "mlp."
    if arch.fused_projections:  # Phi-3 stores them fused already
        qkv, gate_up = weights[attn + "qkv_proj.weight"], weights[mlp + "gate_up_proj.weight"]
    else:
        qkv = torch.cat([weights[attn + f"{name}_proj.weight"] for name in "qkv"])
        gate_up = torch.cat([weights[mlp + "gate_proj.weight"], weights[mlp + "up_proj.weight"]])
    bias = arch.attention_bias
    qkv_bias = torch.cat([weights[attn + f"{n}_proj.bias"] for n in "qkv"]) if bias else None
    window = arch.layer_window(layer)
    layer_weights = LayerWeights(
        input_norm=norm.weight(weights[prefix + "input_layernorm.weight"]),
        qkv=qkv,
        qkv_bias=qkv_bias,
        o=weights[attn + "o_proj.weight"],
        o_bias=weights[attn + "o_proj.bias"] if arch.o_proj_bias else None,
        post_norm=norm.weight(weights[prefix + "post_attention_layernorm.weight"]),
        gate_up=gate_up,
        down=weights[mlp + "down_proj.weight"],
        window=window,
        rope=1 if window and arch.local_rope_theta is not None else 0,
    )
    if arch.qk_norm:
        layer_weights.q_norm = norm.weight(weights[attn + "q_norm.weight"])
        layer_weights.k_norm = norm.weight(weights[attn + "k_norm.weight"])
    if arch.gemma_norms:  # post_attention_layernorm norms the attention output instead
        layer_weights.attention_out_norm = layer_weights.post_norm
        layer_weights.post_norm = norm.weight(weights[prefix + "pre_feedforward_layernorm.weight"])
        layer_weights.mlp_out_norm = norm.weight(
            weights[prefix + "post_feedforward_layernorm.weight"]
        )
    return layer_weights


class LlamaModel:
    """Weights plus the forward pass; stateless across steps (the KV lives in the pool).

    A layer is a fixed sequence of calls whatever the batch: no data-dependent Python
    control flow, no host syncs, so that a decode step can be captured as a CUDA graph.
    """

    def __init__(
        self,
        arch: ModelArch,
        weights: dict[str, torch.Tensor],
        kernels: Kernels,
        max_model_len: int | None = None,
    ) -> None:
        self.arch = arch
        self.kernels = kernels
        self.norm_fn = RMSNorm(arch.rms_norm_eps, unit_offset=arch.gemma_norms)
        self.activation = ACTIVATION_FUNCTIONS[arch.hidden_act]
        self.embed = weights["model.embed_tokens.weight"]  # [vocab, hidden]
        self.embed_scale = embedding_scale(arch, self.embed.dtype)  # Gemma's, else None
        self.norm = self.norm_fn.weight(weights["model.norm.weight"])
        self.lm_head = weights["lm_head.weight"]  # [vocab, hidden]
        self.layers = [fuse_layer(weights, i, arch, self.norm_fn) for i in range(arch.num_layers)]
        # [max_model_len, 2, rotary_dim // 2] each: one per kind of layer (Gemma 3: two)
        self.cos_sin = rope_tables(
            arch, max_model_len or arch.max_position_embeddings, self.embed.device, self.embed.dtype
        )
        self.attention_scale = arch.attention_scale
        self.attention_softcap = arch.attn_logit_softcapping or 0.0  # 0: none, for the kernels
        self.qkv_split = [arch.q_size, arch.kv_size, arch.kv_size]
        self.qkv_slices = [
            0,
            arch.q_size,
            arch.q_size + arch.kv_size,
            arch.q_size + 2 * arch.kv_size,
        ]
        self.gate_up_slices = [0, arch.intermediate_size, 2 * arch.intermediate_size]
        self.hidden_slices = [0, arch.hidden_size]

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_pages: torch.Tensor) -> torch.Tensor:
        """Logits of the batch's `logits_indices` tokens, float32 `[num_logits, vocab]`.

        kv_pages: [num_pages, num_layers, 2, block_size, num_kv_heads, head_dim]"""
        hidden = self.embed[batch.input_ids]  # [num_tokens, hidden]
        if self.embed_scale is not None:
            hidden = hidden * self.embed_scale
        # per table: cos, sin [num_tokens, 1, rotary_dim // 2] each, broadcast over heads
        rotations = [table[batch.positions].unsqueeze(1).unbind(2) for table in self.cos_sin]
        for index, layer in enumerate(self.layers):
            cos, sin = rotations[layer.rope]
            hidden = self._layer(index, layer, hidden, cos, sin, batch, kv_pages)
        hidden = self.norm_fn(hidden[batch.logits_indices], self.norm)
        logits = softcap(hidden @ self.lm_head.T, self.arch.final_logit_softcapping)
        return logits.float()

    def _layer(
        self,
        index: int,
        layer: LayerWeights,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: ForwardBatch,
        kv_pages: torch.Tensor,
    ) -> torch.Tensor:
        norm, lora = self.norm_fn, batch.lora
        x = norm(hidden, layer.input_norm)
        qkv = F.linear(x, layer.qkv, layer.qkv_bias)  # [num_tokens, q_size + 2 * kv_size]
        self._add_lora(lora, index, QKV, x, qkv, self.qkv_slices)
        attn = self._attention(index, layer, qkv, cos, sin, batch, kv_pages)  # [tokens, q_size]
        out = F.linear(attn, layer.o, layer.o_bias)
        self._add_lora(lora, index, O_PROJ, attn, out, self.hidden_slices)
        if layer.attention_out_norm is not None:
            out = norm(out, layer.attention_out_norm)
        hidden = hidden + out
        x = norm(hidden, layer.post_norm)
        gate_up = F.linear(x, layer.gate_up)  # [num_tokens, 2 * intermediate]
        self._add_lora(lora, index, GATE_UP, x, gate_up, self.gate_up_slices)
        gate, up = gate_up.chunk(2, dim=-1)
        act = self.activation(gate).mul_(up)  # [num_tokens, intermediate]
        down = F.linear(act, layer.down)
        self._add_lora(lora, index, DOWN, act, down, self.hidden_slices)
        if layer.mlp_out_norm is not None:
            down = norm(down, layer.mlp_out_norm)
        return hidden.add_(down)

    def _attention(
        self,
        index: int,
        layer: LayerWeights,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: ForwardBatch,
        kv_pages: torch.Tensor,
    ) -> torch.Tensor:
        arch = self.arch
        q, k, v = qkv.split(self.qkv_split, dim=-1)
        q = q.view(-1, arch.num_heads, arch.head_dim)  # [tokens, heads, dim]
        k = k.view(-1, arch.num_kv_heads, arch.head_dim)
        if layer.q_norm is not None and layer.k_norm is not None:  # per head, before RoPE
            q, k = self.norm_fn(q, layer.q_norm), self.norm_fn(k, layer.k_norm)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = v.view(-1, arch.num_kv_heads, arch.head_dim)  # a view of qkv
        self.kernels.write_kv(kv_pages, index, k, v, batch.slot_mapping)
        out = self.kernels.paged_attention(
            q,
            kv_pages,
            index,
            batch.block_tables,
            batch.query_starts,
            batch.context_lens,
            self.attention_scale,
            window=layer.window,
            softcap=self.attention_softcap,
        )
        return out.view(-1, arch.q_size)

    def _add_lora(
        self,
        lora: LoraBatch | None,
        layer: int,
        group: int,
        x: torch.Tensor,
        out: torch.Tensor,
        slice_starts: list[int],
    ) -> None:
        """out[:, slice i] += x @ A_i.T @ B_i for each token's adapter (all slices in one launch)."""
        if lora is None:
            return
        tables = lora.tables[layer][group]
        starts, slots = lora.segment_starts, lora.segment_slots
        y = self.kernels.lora_shrink(
            x, lora.pool, tables.a_offsets, tables.ranks, starts, slots, lora.max_rank
        )  # [num_tokens, num_slices, max_rank]
        self.kernels.lora_expand(
            out, y, lora.pool, tables.b_offsets, tables.ranks, starts, slots, slice_starts
        )
