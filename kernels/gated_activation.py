"""The gated MLP's activation times its up projection: one launch where torch launches two.

Semantics (ops.GatedActivation): out = act(gate) * up, gate = gate_up[:, :n] and
up = gate_up[:, n:], n = intermediate, with

    silu(g)      = g / (1 + exp(-g))                                      (SwiGLU)
    gelu_tanh(g) = g / 2 * (1 + tanh(sqrt(2 / pi) * (g + 0.044715 g^3)))  (GeGLU)

computed in float32 and rounded to the model's dtype before the product, which is rounded
once more: torch's `act(gate).mul_(up)` in half precision.

Grid: (token, column tile). Each program reads BLOCK_N columns of gate and of up of one
token and writes BLOCK_N of out: the op's bytes, once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraserve.kernels.checks import FLOAT_DTYPES, check_same_device
from loraserve.kernels.constants import ACTIVATIONS

SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(0.7978845608028654)  # GELU's tanh argument


@triton.jit
def _gated_activation_kernel(
    gate_up_ptr,  # [num_tokens, 2 * intermediate]
    out_ptr,  # [num_tokens, intermediate] contiguous
    intermediate,  # columns of gate (and of up, and of out)
    stride_gate_up_token,
    GELU_TANH: tl.constexpr,  # GeGLU's activation; else SiLU
    BLOCK_N: tl.constexpr,  # columns per program
):
    token = tl.program_id(0).to(tl.int64)
    gated_activation_block(
        gate_up_ptr + token * stride_gate_up_token,
        out_ptr + token * intermediate,
        tl.program_id(1) * BLOCK_N,
        intermediate,
        GELU_TANH,
        BLOCK_N,
    )


@triton.jit
def gated_activation_block(
    gate_up_row,  # pointer to the token's row of gate_up
    out_row,  # pointer to the token's row of out
    first_column,  # of the block, in gate (and up, and out)
    intermediate,
    GELU_TANH: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """BLOCK_N columns of one token's row (this kernel's and the fused
    gated_activation_shrink's, kernels/gated_activation_shrink.py: the same bits)."""
    columns = first_column + tl.arange(0, BLOCK_N)
    mask = columns < intermediate
    gate = tl.load(gate_up_row + columns, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_row + intermediate + columns, mask=mask, other=0.0).to(tl.float32)
    if GELU_TANH:
        inner = SQRT_2_OVER_PI * (gate + 0.044715 * gate * gate * gate)
        decay = tl.exp(-2.0 * tl.abs(inner))  # in (0, 1]: no overflow
        tanh = tl.where(inner >= 0, 1.0, -1.0) * (1.0 - decay) / (1.0 + decay)
        activated = 0.5 * gate * (1.0 + tanh)
    else:
        activated = gate / (1.0 + tl.exp(-gate))
    dtype = out_row.dtype.element_ty
    out = activated.to(dtype).to(tl.float32) * up
    tl.store(out_row + columns, out.to(dtype), mask=mask)


def gated_activation(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """ops.GatedActivation. gate_up of a float dtype, unit column stride."""
    check_gated_activation(gate_up, activation)
    num_tokens, intermediate = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(num_tokens, intermediate, dtype=gate_up.dtype, device=gate_up.device)
    if out.numel() == 0:
        return out
    block_n = column_block(intermediate)
    grid = (num_tokens, triton.cdiv(intermediate, block_n))
    _gated_activation_kernel[grid](
        gate_up,
        out,
        intermediate,
        gate_up.stride(0),
        GELU_TANH=activation == "gelu_pytorch_tanh",
        BLOCK_N=block_n,
        num_warps=4,
    )
    return out


def column_block(intermediate: int) -> int:
    """1024 columns (2 KB of bf16 out) per program or step: 4 warps, 8 elements per thread."""
    return min(1024, triton.next_power_of_2(intermediate))


def check_gated_activation(gate_up: torch.Tensor, activation: str) -> None:
    check_same_device(gate_up=gate_up)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(
            f"gate_up must be [num_tokens, 2 * intermediate] with unit column stride, got "
            f"{tuple(gate_up.shape)} strides {gate_up.stride()}"
        )
    if gate_up.dtype not in FLOAT_DTYPES:
        raise ValueError(f"gate_up must be a float tensor, got {gate_up.dtype}")
