"""The Llama-family forward pass (Llama 1/2/3, Mistral, Qwen2) over a flat token batch.

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
from loraserve.models.rope import rope_attention_scaling, rope_inv_freq


@dataclass
class LayerWeights:
    """One decoder layer's weights, q/k/v and gate/up fused."""

    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [q_size + 2 * kv_size, hidden]
    qkv_bias: torch.Tensor | None  # [q_size + 2 * kv_size]
    o: torch.Tensor  # [hidden, q_size]
    o_bias: torch.Tensor | None  # [hidden]
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor  # [hidden, intermediate]


def fuse_layer(weights: dict[str, torch.Tensor], layer: int, arch: ModelArch) -> LayerWeights:
    """Take one layer's tensors out of the checkpoint dict, fusing q/k/v and gate/up."""
    prefix = f"model.layers.{layer}."
    attn, mlp = prefix + "self_attn.", prefix + "mlp."
    qkv = [weights[attn + f"{name}_proj.weight"] for name in "qkv"]
    bias = arch.attention_bias
    qkv_bias = torch.cat([weights[attn + f"{n}_proj.bias"] for n in "qkv"]) if bias else None
    return LayerWeights(
        input_norm=weights[prefix + "input_layernorm.weight"],
        qkv=torch.cat(qkv),
        qkv_bias=qkv_bias,
        o=weights[attn + "o_proj.weight"],
        o_bias=weights[attn + "o_proj.bias"] if arch.o_proj_bias else None,
        post_norm=weights[prefix + "post_attention_layernorm.weight"],
        gate_up=torch.cat([weights[mlp + "gate_proj.weight"], weights[mlp + "up_proj.weight"]]),
        down=weights[mlp + "down_proj.weight"],
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As transformers' LlamaRMSNorm: normalize in float32, scale in the input dtype."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)  # one call; the same float32 math
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin].

    x: [num_tokens, heads, head_dim]; cos, sin: [num_tokens, 1, head_dim // 2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LlamaModel:
    """Weights plus the forward pass; stateless across steps (the KV lives in the pool).

    A layer is a fixed sequence of calls whatever the batch: no data-dependent Python
    control flow, no host syncs, so that a decode step can be captured as a CUDA graph.
    """

    def __init__(self, arch: ModelArch, weights: dict[str, torch.Tensor], kernels: Kernels) -> None:
        self.arch = arch
        self.kernels = kernels
        self.embed = weights["model.embed_tokens.weight"]  # [vocab, hidden]
        self.norm = weights["model.norm.weight"]
        self.lm_head = weights["lm_head.weight"]  # [vocab, hidden]
        self.layers = [fuse_layer(weights, i, arch) for i in range(arch.num_layers)]
        device = self.embed.device
        inv_freq = rope_inv_freq(arch).to(device)  # [head_dim // 2]
        positions = torch.arange(arch.max_position_embeddings, device=device, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)  # [max_positions, head_dim // 2]
        scaling = rope_attention_scaling(arch)
        # [max_positions, 2, head_dim // 2]: cos and sin side by side, one gather per step
        self.cos_sin = torch.stack((angles.cos(), angles.sin()), dim=1).mul(scaling)
        self.cos_sin = self.cos_sin.to(self.embed.dtype)
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
        # [num_tokens, 1, head_dim // 2] each, broadcast over heads
        cos, sin = self.cos_sin[batch.positions].unsqueeze(1).unbind(2)
        for index, layer in enumerate(self.layers):
            hidden = self._layer(index, layer, hidden, cos, sin, batch, kv_pages)
        hidden = rms_norm(hidden[batch.logits_indices], self.norm, self.arch.rms_norm_eps)
        return (hidden @ self.lm_head.T).float()

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
        eps, lora = self.arch.rms_norm_eps, batch.lora
        x = rms_norm(hidden, layer.input_norm, eps)
        qkv = F.linear(x, layer.qkv, layer.qkv_bias)  # [num_tokens, q_size + 2 * kv_size]
        self._add_lora(lora, index, QKV, x, qkv, self.qkv_slices)
        attn = self._attention(index, qkv, cos, sin, batch, kv_pages)  # [num_tokens, q_size]
        out = F.linear(attn, layer.o, layer.o_bias)
        self._add_lora(lora, index, O_PROJ, attn, out, self.hidden_slices)
        hidden = hidden + out
        x = rms_norm(hidden, layer.post_norm, eps)
        gate_up = F.linear(x, layer.gate_up)  # [num_tokens, 2 * intermediate]
        self._add_lora(lora, index, GATE_UP, x, gate_up, self.gate_up_slices)
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate).mul_(up)  # [num_tokens, intermediate]
        down = F.linear(act, layer.down)
        self._add_lora(lora, index, DOWN, act, down, self.hidden_slices)
        return hidden.add_(down)

    def _attention(
        self,
        index: int,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: ForwardBatch,
        kv_pages: torch.Tensor,
    ) -> torch.Tensor:
        arch = self.arch
        q, k, v = qkv.split(self.qkv_split, dim=-1)
        q = apply_rope(q.view(-1, arch.num_heads, arch.head_dim), cos, sin)  # [tokens, heads, dim]
        k = apply_rope(k.view(-1, arch.num_kv_heads, arch.head_dim), cos, sin)
        v = v.view(-1, arch.num_kv_heads, arch.head_dim)  # a view of qkv
        self.kernels.write_kv(kv_pages, index, k, v, batch.slot_mapping)
        out = self.kernels.paged_attention(
            q,
            kv_pages,
            index,
            batch.block_tables,
            batch.query_starts,
            batch.context_lens,
            arch.head_dim**-0.5,
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
