"""Fused residual add + RMSNorm: one launch where torch launches eight.

Semantics: hidden += delta (in place, when given); out = rms_norm(hidden) * weight per row,
    rms_norm(h) = h * rsqrt(mean(h ** 2) + eps), h in float32,
rounded where transformers rounds (ops.AddRMSNorm): Llama's weight (the hidden dtype) scales
the normed row after it is rounded to that dtype; Gemma's float32 weight (1 + w) scales it
in float32 before the one rounding. The sum hidden + delta is rounded to hidden's dtype
before it is normed, as torch's add rounds it.

Grid: one program per row, a row being one token (`[num_tokens, dim]`) or one head of one
token (`[num_tokens, num_heads, dim]`, the per-head q/k norms of Qwen3 and Gemma 3). The
program holds its whole row in registers (dim <= 8192: at most 32 KB of float32), reads
hidden and delta once, writes hidden once (with delta) and the normed row once: the bytes
of the op, nothing more. A decode step's residual add of a layer's MLP output is thus
folded into the next layer's input norm, and the attention output's into the
post-attention norm (models/llama.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraserve.kernels.checks import FLOAT_DTYPES, check_same_device


@triton.jit
def _add_rms_norm_kernel(
    hidden_ptr,  # [num_tokens, num_heads, dim], updated in place when HAS_DELTA
    delta_ptr,  # hidden's shape, or hidden_ptr itself (unread) when not HAS_DELTA
    weight_ptr,  # [dim], hidden's dtype or float32
    out_ptr,  # [num_tokens, num_heads, dim] contiguous
    num_heads,  # heads per token (1 for a [num_tokens, dim] hidden)
    dim,  # elements of a row
    eps,  # added to the mean square
    stride_hidden_token,
    stride_hidden_head,
    stride_delta_token,
    stride_delta_head,
    HAS_DELTA: tl.constexpr,  # add delta into hidden first
    SCALE_IN_FLOAT32: tl.constexpr,  # Gemma's float32 weight: scale, then round once
    BLOCK_N: tl.constexpr,  # power of two >= dim
):
    row = tl.program_id(0).to(tl.int64)
    token, head = row // num_heads, row % num_heads
    add_rms_norm_row(
        hidden_ptr + token * stride_hidden_token + head * stride_hidden_head,
        delta_ptr + token * stride_delta_token + head * stride_delta_head,
        weight_ptr,
        out_ptr + row * dim,
        dim,
        eps,
        HAS_DELTA,
        SCALE_IN_FLOAT32,
        BLOCK_N,
    )


@triton.jit
def add_rms_norm_row(
    hidden_row,  # pointer to the row of hidden, updated in place when HAS_DELTA
    delta_row,  # pointer to the row of delta (unread when not HAS_DELTA)
    weight_ptr,  # [dim]
    out_row,  # pointer to the row of out
    dim,
    eps,
    HAS_DELTA: tl.constexpr,
    SCALE_IN_FLOAT32: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One row of the op, held whole in registers (this kernel's and the fused
    add_rms_norm_shrink's, kernels/add_rms_norm_shrink.py: the same bits)."""
    columns = tl.arange(0, BLOCK_N)
    mask = columns < dim
    hidden = tl.load(hidden_row + columns, mask=mask, other=0.0)
    dtype = hidden_row.dtype.element_ty
    if HAS_DELTA:
        delta = tl.load(delta_row + columns, mask=mask, other=0.0)
        hidden = (hidden.to(tl.float32) + delta.to(tl.float32)).to(dtype)
        tl.store(hidden_row + columns, hidden, mask=mask)
    x = hidden.to(tl.float32)
    mean_square = tl.sum(x * x, axis=0) / dim
    normed = x * tl.rsqrt(mean_square + eps)
    weight = tl.load(weight_ptr + columns, mask=mask, other=0.0).to(tl.float32)
    if not SCALE_IN_FLOAT32:  # Llama: round the normed row, then the (exact) product again
        normed = normed.to(dtype).to(tl.float32)
    tl.store(out_row + columns, (normed * weight).to(dtype), mask=mask)


def add_rms_norm(
    hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """ops.AddRMSNorm. hidden (2-D or 3-D, unit stride on its last axis) and delta share a
    float dtype; weight is hidden's dtype or float32; all on one device."""
    check_same_device(hidden=hidden, weight=weight, **({} if delta is None else {"delta": delta}))
    check_add_rms_norm(hidden, delta, weight)
    view = _per_head(hidden)  # [num_tokens, num_heads, dim]
    delta_view = view if delta is None else _per_head(delta)
    num_tokens, num_heads, dim = view.shape
    out = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    if out.numel() == 0:
        return out
    block_n = triton.next_power_of_2(dim)
    _add_rms_norm_kernel[(num_tokens * num_heads,)](
        view,
        delta_view,
        weight,
        out,
        num_heads,
        dim,
        eps,
        view.stride(0),
        view.stride(1),
        delta_view.stride(0),
        delta_view.stride(1),
        HAS_DELTA=delta is not None,
        SCALE_IN_FLOAT32=weight.dtype == torch.float32,
        BLOCK_N=block_n,
        num_warps=row_warps(block_n),
    )
    return out


def row_warps(block_n: int) -> int:
    """Warps of a program that holds a row of `block_n` columns: about 8 elements per thread,
    a 4096-wide row takes 16 warps' worth of lanes at most. The fused add_rms_norm_shrink
    runs with as many, so that its sum of squares adds in this kernel's order."""
    return min(16, max(1, block_n // 256))


def _per_head(tensor: torch.Tensor) -> torch.Tensor:
    """[num_tokens, dim] as [num_tokens, 1, dim] (a view); 3-D tensors as they are."""
    return tensor if tensor.dim() == 3 else tensor.unsqueeze(1)


def check_add_rms_norm(
    hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor
) -> None:
    if hidden.dim() not in (2, 3) or hidden.stride(-1) != 1:
        raise ValueError(
            f"hidden must be [num_tokens, dim] or [num_tokens, num_heads, dim] with unit "
            f"stride on dim, got {tuple(hidden.shape)} strides {hidden.stride()}"
        )
    if hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden must be a float tensor, got {hidden.dtype}")
    if delta is not None and (
        delta.shape != hidden.shape or delta.dtype != hidden.dtype or delta.stride(-1) != 1
    ):
        raise ValueError(
            f"delta must be hidden's {tuple(hidden.shape)} {hidden.dtype} with unit stride on "
            f"its last axis, got {tuple(delta.shape)} {delta.dtype}"
        )
    if weight.shape != hidden.shape[-1:] or weight.dtype not in (hidden.dtype, torch.float32):
        raise ValueError(
            f"weight must be [{hidden.shape[-1]}] of {hidden.dtype} or float32, got "
            f"{tuple(weight.shape)} {weight.dtype}"
        )
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous")
