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

A decode step is a launch budget (bench/launches.py counts it): between the matmuls a
layer calls three fused glue ops. The residual stream `hidden` is updated in place by
the norms: each residual add is folded into the RMSNorm that follows it (a layer's MLP
output into the next layer's input norm, the last one's into the final norm; the
attention output into the post-attention norm); the activation and its product with `up`
are one op. In a decode batch (`batch.decode`: every sequence brings one token, as in
every CUDA graph) RoPE on q and k, the KV write and attention are one op
(`rope_write_kv_attention`); a prefill or mixed batch calls `rope_write_kv`, then
`paged_attention`. Llama's decode layer is then eight launches (add + norm, qkv GEMM,
RoPE + KV write + attention, o GEMM, add + norm, gate_up GEMM, SiLU * up, down GEMM),
plus the split-KV combine on a GPU when a small batch's long contexts are partitioned;
Qwen3's and Gemma 3's q/k norms add a launch each. With LoRA (`batch.lora` not None, a
choice made per CUDA-graph set, never inside one) the glue op before a projection group
also computes that group's LoRA shrink (`add_rms_norm_shrink` before q/k/v and gate/up,
`gated_activation_shrink` before down: one launch each on Triton for a decode step, the
two ops elsewhere), so a layer adds an expand per adapted group and the o group's shrink:
13 launches with all seven modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraserve.kernels.ops import Kernels, LoraWeights, OutputSlices, Scores
from loraserve.models.arch import DOWN, GATE_UP, O_PROJ, QKV, ModelArch
from loraserve.models.batch import ForwardBatch, LoraBatch, LoraTables
from loraserve.models.layers import RMSNorm, embedding_scale, rope_tables, softcap
from loraserve.models.tensor_parallel import Collectives, vocab_rows


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
    scores: Scores  # the attention's scale, sliding window (0: none) and soft cap (0: none)
    q_norm: torch.Tensor | None = None  # [head_dim] (Qwen3, Gemma 3)
    k_norm: torch.Tensor | None = None  # [head_dim]
    attention_out_norm: torch.Tensor | None = None  # [hidden], Gemma's post_attention_layernorm
    mlp_out_norm: torch.Tensor | None = None  # [hidden], Gemma's post_feedforward_layernorm
    rope: int = 0
    """Which of the model's cos/sin tables the layer rotates with (1: Gemma 3's local one)."""


@dataclass(frozen=True)
class LayerPool:
    """What one layer reads in the unified pool, bound once (`LlamaModel.bind`)."""

    kv: torch.Tensor
    """The layer's KV view, [num_pages, 2, block_size, num_kv_heads, head_dim]."""
    lora: tuple[LoraWeights, ...]
    """Per module group (models.arch.LORA_GROUPS: q/k/v, o, gate/up, down)."""


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
        scores=Scores(arch.attention_scale, window, arch.attn_logit_softcapping or 0.0),
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

    The device state every step reads besides its batch is bound once (`bind`), so that
    `forward(batch)` takes the step's batch alone. A layer's calls depend on two host facts
    of the batch alone, each the same for every batch of a CUDA-graph set (`batch.lora`
    present, `batch.decode`): no data-dependent Python control flow, no host syncs, so that
    a decode step can be captured as a CUDA graph.
    """

    pools: list[LayerPool]
    """Each layer's KV view and adapter tables (`bind`)."""

    def __init__(
        self,
        arch: ModelArch,
        weights: dict[str, torch.Tensor],
        kernels: Kernels,
        max_model_len: int | None = None,
        collectives: Collectives | None = None,
    ) -> None:
        """Under tensor parallelism `arch` and `weights` are the rank's shard
        (models/tensor_parallel.py) and `collectives` completes its partial results."""
        self.arch = arch
        self.kernels = kernels
        self.collectives = collectives
        self.vocab_first = (
            0 if collectives is None else vocab_rows(arch.vocab_size, collectives.shard)[0]
        )
        self.norm_fn = RMSNorm(arch.rms_norm_eps, unit_offset=arch.gemma_norms)
        self.embed = weights["model.embed_tokens.weight"]  # [vocab, hidden]
        self.embed_scale = embedding_scale(arch, self.embed.dtype)  # Gemma's, else None
        self.norm = self.norm_fn.weight(weights["model.norm.weight"])
        self.lm_head = weights["lm_head.weight"]  # [vocab, hidden]
        self.layers = [fuse_layer(weights, i, arch, self.norm_fn) for i in range(arch.num_layers)]
        # [max_model_len, 2, rotary_dim // 2] each: one per kind of layer (Gemma 3: two)
        self.cos_sin = rope_tables(
            arch, max_model_len or arch.max_position_embeddings, self.embed.device, self.embed.dtype
        )
        self.qkv_split = [arch.q_size, arch.kv_size, arch.kv_size]

    def bind(
        self, kv_pages: torch.Tensor, pool: torch.Tensor, lora_tables: list[list[LoraTables]]
    ) -> None:
        """Point the forward pass at the unified pool, once, when the pool is made (after
        the weights, whose size sets the pool's); these tensors never move.

        kv_pages:    [num_pages, num_layers, 2, block_size, num_kv_heads, head_dim], its KV view
        pool:        [num_pages, page_numel], where the adapters' matrices are
        lora_tables: [layer][module group] views of its offset and rank tables"""
        arch = self.arch
        q, kv, intermediate = arch.q_size, arch.kv_size, arch.intermediate_size
        hidden = OutputSlices.of([0, arch.hidden_size], pool.device)
        slices = {  # where each slice of a module group's fused output begins
            QKV: OutputSlices.of([0, q, q + kv, q + 2 * kv], pool.device),
            O_PROJ: hidden,
            GATE_UP: OutputSlices.of([0, intermediate, 2 * intermediate], pool.device),
            DOWN: hidden,
        }
        self.pools = [
            LayerPool(
                kv_pages[:, layer],
                tuple(
                    LoraWeights(
                        pool,
                        table.a_offsets,
                        table.b_offsets,
                        table.ranks,
                        slices[group],
                        table.g_offsets,
                        self._group_bias(layer, group),
                    )
                    for group, table in enumerate(tables)
                ),
            )
            for layer, tables in enumerate(lora_tables)
        ]

    def _group_bias(self, layer: int, group: int) -> torch.Tensor | None:
        """The bias of a module group's fused projection (which DoRA's g does not scale)."""
        weights = self.layers[layer]
        return {QKV: weights.qkv_bias, O_PROJ: weights.o_bias}.get(group)

    def base_weight(self, layer: int, module: str) -> torch.Tensor:
        """memory.dora.BaseWeights: [out, in] of one linear (`q_proj`, ..., `qkv_proj`), a view
        of the fused weight the forward computes with."""
        weights, arch = self.layers[layer], self.arch
        q, kv, intermediate = arch.q_size, arch.kv_size, arch.intermediate_size
        rows = {
            "q_proj": (weights.qkv, 0, q),
            "k_proj": (weights.qkv, q, q + kv),
            "v_proj": (weights.qkv, q + kv, q + 2 * kv),
            "qkv_proj": (weights.qkv, 0, q + 2 * kv),
            "o_proj": (weights.o, 0, arch.hidden_size),
            "gate_proj": (weights.gate_up, 0, intermediate),
            "up_proj": (weights.gate_up, intermediate, 2 * intermediate),
            "gate_up_proj": (weights.gate_up, 0, 2 * intermediate),
            "down_proj": (weights.down, 0, arch.hidden_size),
        }
        fused, first, last = rows[module]
        return fused[first:last]

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits of the batch's `logits_indices` tokens, float32 `[num_logits, vocab]`."""
        hidden = self._embed(batch.input_ids)  # [num_tokens, hidden], the residual stream
        if self.embed_scale is not None:
            hidden = hidden * self.embed_scale
        # per table: [num_tokens, 2, rotary_dim // 2], each token's cos and sin
        cos_sin = [table[batch.positions] for table in self.cos_sin]
        mlp_out = None  # the previous layer's MLP output, which the next norm adds
        for layer, pool in zip(self.layers, self.pools, strict=True):
            mlp_out = self._layer(layer, pool, hidden, mlp_out, cos_sin[layer.rope], batch)
        hidden = self._norm(hidden, mlp_out, self.norm)
        logits = hidden[batch.logits_indices] @ self.lm_head.T
        if self.collectives is not None:  # each rank's slice of the vocabulary, in rank order
            logits = self.collectives.all_gather(logits)[:, : self.arch.vocab_size]
        return softcap(logits, self.arch.final_logit_softcapping).float()

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embedding rows of `input_ids`; under tensor parallelism each rank gathers the
        rows of its vocabulary slice, zeros elsewhere, and one all-reduce adds them up
        (exactly: every other term is zero)."""
        if self.collectives is None:
            return self.embed[input_ids]
        local = input_ids - self.vocab_first
        inside = (local >= 0) & (local < self.embed.shape[0])
        hidden = self.embed[local.clamp(0, self.embed.shape[0] - 1)]  # a copy: gathered rows
        hidden.masked_fill_(~inside.unsqueeze(-1), 0)
        self.collectives.all_reduce(hidden)
        return hidden

    def _layer(
        self,
        layer: LayerWeights,
        pool: LayerPool,
        hidden: torch.Tensor,
        mlp_out: torch.Tensor | None,
        cos_sin: torch.Tensor,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        """One decoder layer. `hidden` is the residual stream, updated in place: the
        previous layer's `mlp_out` (None before the first layer) is added by this layer's
        input norm, its attention output by its post-attention norm. Returns the layer's
        MLP output, for the next norm to add. [num_tokens, hidden] each."""
        lora, adapters = batch.lora, pool.lora
        # y: [num_tokens, num_slices, max_rank], each group's LoRA shrink (None without LoRA)
        x, y = self._norm_shrink(hidden, mlp_out, layer.input_norm, lora, adapters[QKV])
        qkv = F.linear(x, layer.qkv, layer.qkv_bias)  # [num_tokens, q_size + 2 * kv_size]
        self._expand(lora, adapters[QKV], y, qkv)
        attn = self._attention(layer, pool.kv, qkv, cos_sin, batch)  # [tokens, q_size]
        out = F.linear(attn, layer.o, layer.o_bias)
        self._add_lora(lora, adapters[O_PROJ], attn, out)  # no glue op before o to fuse into
        self._complete(out)
        if layer.attention_out_norm is not None:
            out = self._norm(out, None, layer.attention_out_norm)
        x, y = self._norm_shrink(hidden, out, layer.post_norm, lora, adapters[GATE_UP])
        gate_up = F.linear(x, layer.gate_up)  # [num_tokens, 2 * intermediate]
        self._expand(lora, adapters[GATE_UP], y, gate_up)
        act, y = self._activation_shrink(gate_up, lora, adapters[DOWN])  # act: [tokens, inter]
        down = F.linear(act, layer.down)
        self._expand(lora, adapters[DOWN], y, down)
        self._complete(down)
        if layer.mlp_out_norm is not None:
            down = self._norm(down, None, layer.mlp_out_norm)
        return down

    def _complete(self, out: torch.Tensor) -> None:
        """Under tensor parallelism: a row-parallel projection's output (base and LoRA) is
        each rank's partial sum; one all-reduce makes it whole on every rank."""
        if self.collectives is not None:
            self.collectives.all_reduce(out)

    def _norm(
        self, hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor
    ) -> torch.Tensor:
        """hidden += delta (in place, unless None); the family's RMSNorm of the sum."""
        return self.kernels.add_rms_norm(hidden, delta, weight, self.norm_fn.eps)

    def _attention(
        self,
        layer: LayerWeights,
        kv: torch.Tensor,
        qkv: torch.Tensor,
        cos_sin: torch.Tensor,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        arch = self.arch
        q, k, v = qkv.split(self.qkv_split, dim=-1)
        q = q.view(-1, arch.num_heads, arch.head_dim)  # [tokens, heads, dim], views of qkv
        k = k.view(-1, arch.num_kv_heads, arch.head_dim)
        v = v.view(-1, arch.num_kv_heads, arch.head_dim)
        if layer.q_norm is not None and layer.k_norm is not None:  # per head, before RoPE
            q, k = self._norm(q, None, layer.q_norm), self._norm(k, None, layer.k_norm)
        kernels, slots, scores = self.kernels, batch.slot_mapping, layer.scores
        if batch.decode:  # one op (one launch on Triton); fixed per graph set, as `lora` is
            out = kernels.rope_write_kv_attention(q, k, v, cos_sin, kv, slots, batch, scores)
        else:
            q = kernels.rope_write_kv(q, k, v, cos_sin, kv, slots)
            out = kernels.paged_attention(q, kv, batch, scores)
        return out.view(-1, arch.q_size)

    def _norm_shrink(
        self,
        hidden: torch.Tensor,
        delta: torch.Tensor | None,
        weight: torch.Tensor,
        lora: LoraBatch | None,
        weights: LoraWeights,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`_norm`, and with LoRA the shrink of its output for the group it feeds (one op)."""
        if lora is None:
            return self._norm(hidden, delta, weight), None
        eps = self.norm_fn.eps
        return self.kernels.add_rms_norm_shrink(hidden, delta, weight, eps, weights, lora)

    def _activation_shrink(
        self, gate_up: torch.Tensor, lora: LoraBatch | None, weights: LoraWeights
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """act(gate) * up, and with LoRA the down group's shrink of it (one op)."""
        activation = self.arch.hidden_act
        if lora is None:
            return self.kernels.gated_activation(gate_up, activation), None
        return self.kernels.gated_activation_shrink(gate_up, activation, weights, lora)

    def _add_lora(
        self, lora: LoraBatch | None, weights: LoraWeights, x: torch.Tensor, out: torch.Tensor
    ) -> None:
        """out[:, slice i] += x @ A_i.T @ B_i for each token's adapter: a shrink, an expand."""
        if lora is not None:
            y = self.kernels.lora_shrink(x, weights, lora)  # [num_tokens, num_slices, max_rank]
            self._expand(lora, weights, y, out)

    def _expand(
        self,
        lora: LoraBatch | None,
        weights: LoraWeights,
        y: torch.Tensor | None,
        out: torch.Tensor,
    ) -> None:
        """out[:, slice i] += y[:, i] @ B_i for each token's adapter (all slices in one launch);
        nothing without LoRA."""
        if lora is not None and y is not None:  # y is None exactly when lora is (for mypy)
            self.kernels.lora_expand(out, y, weights, lora)
