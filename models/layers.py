"""The pieces a decoder layer is built from besides its kernels, in each family's numerics:
norm weights, RoPE tables, the embedding scale, soft-capping. (The norms, RoPE and the
gated activation themselves are kernel ops, kernels/ops.py, fused for the GPU.)

Each follows its transformers modeling file operation for operation where the order
changes the rounding (norms in half precision, the embedding scale rounded to the
model's dtype), so that float32 results match to rounding and half precision ones
round where transformers rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraserve.models.arch import ModelArch
from loraserve.models.rope import rope_attention_scaling, rope_inv_freq, use_long_rope


@dataclass(frozen=True)
class RMSNorm:
    """A family's RMSNorm over the last dimension, computed by the kernels' `add_rms_norm`.

    Llama's: normalize in float32, round to the input dtype, then scale by the weight.
    Gemma's (`unit_offset`): scale by (1 + weight) in float32, then round. `weight()`
    prepares a checkpoint's norm weight once, at load time, in the form that tells the
    kernels which rounding order to follow (ops.AddRMSNorm): Llama's in the model's dtype,
    Gemma's 1 + w in float32."""

    eps: float
    unit_offset: bool

    def weight(self, stored: torch.Tensor) -> torch.Tensor:
        """The tensor the norm scales by: the stored weight, or 1 + weight in float32."""
        return 1.0 + stored.float() if self.unit_offset else stored


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap) (Gemma's soft-capping), or x when cap is None."""
    if cap is None:
        return x
    return torch.tanh(x / cap) * cap


def rope_tables(
    arch: ModelArch, max_model_len: int, device: torch.device, dtype: torch.dtype
) -> list[torch.Tensor]:
    """cos and sin of every position up to max_model_len, one table per kind of layer:
    [global] or, with Gemma 3's local base, [global, local].

    Each table: [max_model_len, 2, rotary_dim // 2], cos and sin side by side (one gather
    per step), computed in float32 as transformers does, then rounded to `dtype`."""
    long = use_long_rope(arch, max_model_len)
    kinds = [False] if arch.local_rope_theta is None else [False, True]
    positions = torch.arange(max_model_len, device=device, dtype=torch.float32)
    tables = []
    for local in kinds:
        inv_freq = rope_inv_freq(arch, local=local, long=long).to(device)  # [rotary_dim // 2]
        angles = torch.outer(positions, inv_freq)  # [max_model_len, rotary_dim // 2]
        scaling = rope_attention_scaling(arch, local=local)
        table = torch.stack((angles.cos(), angles.sin()), dim=1).mul(scaling)
        tables.append(table.to(dtype))
    return tables


def embedding_scale(arch: ModelArch, dtype: torch.dtype) -> torch.Tensor | None:
    """Gemma's sqrt(hidden_size), rounded to the model's dtype as transformers rounds it
    (bf16: sqrt(3072) = 55.4256 becomes 55.5); None for the other families."""
    if not arch.gemma_norms:
        return None
    return torch.tensor(arch.hidden_size**0.5).to(dtype)
