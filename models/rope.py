"""Rotary position embedding frequencies, as transformers computes them at model init.

Semantics: for position p and pair index i < head_dim / 2 the rotation angle is
`p * inv_freq[i]`, and cos/sin are multiplied by `rope_attention_scaling(arch)`.

Each rope type reproduces transformers' `ROPE_INIT_FUNCTIONS` (and the models'
`compute_default_rope_parameters`) operation for operation, so that the float32
values are bit-for-bit the ones the Hugging Face reference rotates with:

- default:  inv_freq[i] = 1 / theta ** (2i / head_dim)
- linear:   default / factor
- llama3:   default, low frequencies divided by factor, a smooth blend in between
- dynamic:  the static inv_freq, i.e. dynamic NTK at the original length
"""

from __future__ import annotations

import math

import torch

from loraserve.models.arch import SUPPORTED_ROPE_TYPES, ModelArch


def rope_type(arch: ModelArch) -> str:
    """The rope type of `arch`: `default` when the config has no rope scaling."""
    return "default" if arch.rope_scaling is None else str(arch.rope_scaling["rope_type"])


def _default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """1 / theta ** (2i / dim); int64 arange then float, as transformers does."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim
    return 1.0 / (theta**exponents)  # [dim // 2]


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling: keep high, divide low by factor, blend the middle."""
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def _dynamic_theta(arch: ModelArch, dim: int) -> float:
    """Dynamic NTK's base at seq_len = max_position_embeddings (transformers' init-time value).

    The formula is written out rather than simplified to `theta` so that the float
    rounding is the same as transformers'."""
    assert arch.rope_scaling is not None
    factor = arch.rope_scaling["factor"]
    seq_len = arch.max_position_embeddings
    ratio = (factor * seq_len / arch.max_position_embeddings) - (factor - 1)
    return arch.rope_theta * ratio ** (dim / (dim - 2))


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    """The rotary inverse frequencies of `arch`, float32 on the CPU: `[head_dim // 2]`.

    For `dynamic` (NTK) scaling this is the static inv_freq at the original length:
    transformers re-computes a larger base once a sequence grows past
    `max_position_embeddings`; loraserve does not apply that re-scaling (positions
    past `max_position_embeddings` are not served)."""
    kind = rope_type(arch)
    dim = arch.head_dim
    if kind == "default":
        return _default_inv_freq(arch.rope_theta, dim)
    assert arch.rope_scaling is not None  # load_arch refuses unsupported types
    if kind == "linear":
        return _default_inv_freq(arch.rope_theta, dim) / arch.rope_scaling["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(_default_inv_freq(arch.rope_theta, dim), arch.rope_scaling)
    if kind == "dynamic":
        return _default_inv_freq(_dynamic_theta(arch, dim), dim)
    raise ValueError(f"rope type {kind!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")


def rope_attention_scaling(arch: ModelArch) -> float:
    """The factor cos and sin are multiplied by: 1.0 for every supported rope type.

    (yarn and longrope would scale attention here; `load_arch` refuses them.)"""
    kind = rope_type(arch)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {kind!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    return 1.0
