"""Rotary position embedding frequencies, as transformers computes them at model init.

Semantics: for position p and pair index i < rotary_dim / 2 the rotation angle is
`p * inv_freq[i]`, and cos/sin are multiplied by `rope_attention_scaling(arch)`.

Each rope type reproduces transformers' `ROPE_INIT_FUNCTIONS` (and the models'
`compute_default_rope_parameters`) operation for operation, so that the float32
values are bit-for-bit the ones the Hugging Face reference rotates with:

- default:  inv_freq[i] = 1 / theta ** (2i / head_dim)
- linear:   default / factor
- llama3:   default, low frequencies divided by factor, a smooth blend in between
- dynamic:  the static inv_freq, i.e. dynamic NTK at the original length
- longrope: 1 / (factor_i * theta ** (2i / dim)), with the short or the long factors, and
            cos/sin scaled by sqrt(1 + ln(s) / ln(original length)), s = max / original

Only the first `arch.rotary_dim` dimensions of a head rotate (Phi-4-mini: 3/4 of them).
Gemma 3's sliding-window layers rotate with their own base (`local=True`: default rope
at `local_rope_theta`).

longrope's factors depend on the sequence length in transformers (long ones once a
forward pass reaches past `original_max_position_embeddings`, for that pass only); a
server cannot switch a cached prefix's rotation, so loraserve decides once, as vLLM
does: the long factors when contexts may grow past the original length
(`use_long_rope`), the short ones otherwise. Below that length both agree with
transformers exactly; above it they agree for prompts that start past it.
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


def _longrope_inv_freq(arch: ModelArch, dim: int, long: bool) -> torch.Tensor:
    """1 / (factors * theta ** (2i / dim)), transformers' operation order."""
    assert arch.rope_scaling is not None
    factors = arch.rope_scaling["long_factor" if long else "short_factor"]
    ext_factors = torch.tensor(factors, dtype=torch.float32)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (ext_factors * arch.rope_theta**exponents)


def _longrope_attention_factor(arch: ModelArch) -> float:
    """`attention_factor`, or sqrt(1 + ln(s) / ln(original)) with s = factor or max / original."""
    assert arch.rope_scaling is not None
    scaling = arch.rope_scaling
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or arch.max_position_embeddings / original
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original))


def use_long_rope(arch: ModelArch, max_model_len: int) -> bool:
    """Whether longrope rotates with its long factors: contexts may pass the original length."""
    if rope_type(arch) != "longrope":
        return False
    assert arch.rope_scaling is not None
    return max_model_len > arch.rope_scaling["original_max_position_embeddings"]


def _dynamic_theta(arch: ModelArch, dim: int) -> float:
    """Dynamic NTK's base at seq_len = max_position_embeddings (transformers' init-time value).

    The formula is written out rather than simplified to `theta` so that the float
    rounding is the same as transformers'."""
    assert arch.rope_scaling is not None
    factor = arch.rope_scaling["factor"]
    seq_len = arch.max_position_embeddings
    ratio = (factor * seq_len / arch.max_position_embeddings) - (factor - 1)
    return arch.rope_theta * ratio ** (dim / (dim - 2))


def rope_inv_freq(arch: ModelArch, *, local: bool = False, long: bool = False) -> torch.Tensor:
    """The rotary inverse frequencies of `arch`, float32 on the CPU: `[rotary_dim // 2]`.

    local: of Gemma 3's sliding-window layers. long: longrope's long factors.
    For `dynamic` (NTK) scaling this is the static inv_freq at the original length:
    transformers re-computes a larger base once a sequence grows past
    `max_position_embeddings`; loraserve does not apply that re-scaling (positions
    past `max_position_embeddings` are not served)."""
    kind = rope_type(arch)
    dim = arch.rotary_dim
    if local and arch.local_rope_theta is not None:
        return _default_inv_freq(arch.local_rope_theta, dim)
    if kind == "default":
        return _default_inv_freq(arch.rope_theta, dim)
    assert arch.rope_scaling is not None  # load_arch refuses unsupported types
    if kind == "linear":
        return _default_inv_freq(arch.rope_theta, dim) / arch.rope_scaling["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(_default_inv_freq(arch.rope_theta, dim), arch.rope_scaling)
    if kind == "dynamic":
        return _default_inv_freq(_dynamic_theta(arch, dim), dim)
    if kind == "longrope":
        return _longrope_inv_freq(arch, dim, long)
    raise ValueError(f"rope type {kind!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")


def rope_attention_scaling(arch: ModelArch, *, local: bool = False) -> float:
    """The factor cos and sin are multiplied by: longrope's attention factor, else 1.0."""
    kind = rope_type(arch)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {kind!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    if kind == "longrope" and not (local and arch.local_rope_theta is not None):
        return _longrope_attention_factor(arch)
    return 1.0
