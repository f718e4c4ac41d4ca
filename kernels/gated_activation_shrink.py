"""The gated activation fused with the down projection's LoRA shrink: one launch where a
decode step took two (the activation's and the shrink's).

Semantics (ops.GatedActivationShrink):
    act = act(gate) * up                              (kernels/gated_activation.py)
    y[t, i, :r] = act[t] @ A[slot(t), i].T            (kernels/lora_shrink.py)
with act rounded to gate_up's dtype before the shrink reads it, as the two ops in a row do.

Grid: one program per token, for decode tile maps (one token per tile, tile t = token t,
kernels/lora_tiles.py). The program writes the token's act row in blocks of BLOCK_N
columns, exactly as the plain kernel's programs do (`gated_activation_block`: elementwise,
the same bits), then, after a barrier so that every thread sees the whole stored row, runs
the decode shrink of that token (`shrink_token`: the BGMV program's sum with its blocks and
its 4 warps, so y has the unfused shrink's bits too). What the plain kernel spread over
cdiv(intermediate, 1024) programs per token and the shrink over cdiv(max_rank, 8) is one
program's loops: fewer launches, less parallelism for a small batch (a GPU timing is still
to come).

Other tile maps (prefill and mixed steps) keep the two launches, gated_activation then
lora_shrink (kernels/add_rms_norm_shrink.py says why).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraserve.kernels.gated_activation import (
    check_gated_activation,
    column_block,
    gated_activation,
    gated_activation_block,
)
from loraserve.kernels.lora_shrink import (
    DECODE_BLOCK_K,
    DECODE_BLOCK_R,
    check_triton_shrink,
    lora_shrink,
    shrink_token,
    token_shrink_arguments,
)
from loraserve.kernels.lora_tiles import DECODE_TILE_TOKENS, tiles_for
from loraserve.kernels.ops import LoraWeights, Segments


@triton.jit(
    # Values that change from step to step must not multiply the compiled variants.
    do_not_specialize=["max_rank", "stride_y_token", "stride_y_slice"],
    # Per-layer views of the runner's tables start at any 8-byte boundary.
    do_not_specialize_on_alignment=["a_offsets_ptr", "ranks_ptr"],
)
def _gated_activation_shrink_kernel(
    gate_up_ptr,  # [num_tokens, 2 * intermediate]
    out_ptr,  # [num_tokens, intermediate] contiguous: act, which the shrink reads back
    intermediate,  # columns of gate, of up and of act (the shrink's in_dim)
    stride_gate_up_token,
    pool_ptr,  # flat unified pool; A of (slot, slice) starts at a_offsets[slot, slice]
    a_offsets_ptr,  # [num_slots, num_slices] int64 element offsets (a strided view)
    ranks_ptr,  # [num_slots, num_slices] int32 ranks, 0 = slice not targeted
    tiles_ptr,  # [>= num_tiles, 3] int32 decode tile map: row t = (slot of token t, t, t + 1)
    num_tiles_ptr,  # [1] int32 tiles that hold tokens
    y_ptr,  # [num_tokens, num_slices, max_rank] float32 output
    max_rank,
    num_slices,
    stride_offset_slot,
    stride_offset_slice,
    stride_rank_slot,
    stride_rank_slice,
    stride_y_token,
    stride_y_slice,
    GELU_TANH: tl.constexpr,  # GeGLU's activation; else SiLU
    BLOCK_N: tl.constexpr,  # columns of act per step
    BLOCK_R: tl.constexpr,  # rows of A per step of the shrink
    BLOCK_K: tl.constexpr,  # in_dim step of the shrink's reduction loop
):
    token = tl.program_id(0).to(tl.int64)
    gate_up_row = gate_up_ptr + token * stride_gate_up_token
    for first_column in range(0, intermediate, BLOCK_N):
        gated_activation_block(
            gate_up_row,
            out_ptr + token * intermediate,
            first_column,
            intermediate,
            GELU_TANH,
            BLOCK_N,
        )
    tl.debug_barrier()  # the row of act, stored by every thread, is read back by every thread
    shrink_token(
        token,
        out_ptr,
        pool_ptr,
        a_offsets_ptr,
        ranks_ptr,
        tiles_ptr,
        num_tiles_ptr,
        y_ptr,
        intermediate,
        max_rank,
        num_slices,
        stride_offset_slot,
        stride_offset_slice,
        stride_rank_slot,
        stride_rank_slice,
        stride_y_token,
        stride_y_slice,
        BLOCK_R,
        BLOCK_K,
    )


def gated_activation_shrink(
    gate_up: torch.Tensor, activation: str, weights: LoraWeights, segments: Segments
) -> tuple[torch.Tensor, torch.Tensor]:
    """ops.GatedActivationShrink. gate_up as gated_activation takes it; the pool as
    lora_shrink takes it (gate_up's dtype). One launch for a decode tile map (the one
    `segments` carries, else one built from them), else gated_activation then lora_shrink."""
    tiles = tiles_for(segments)
    if tiles.tile_tokens != DECODE_TILE_TOKENS:
        act = gated_activation(gate_up, activation)
        return act, lora_shrink(act, weights, segments)
    check_gated_activation(gate_up, activation)
    num_tokens, intermediate = gate_up.shape[0], gate_up.shape[1] // 2
    act = torch.empty(num_tokens, intermediate, dtype=gate_up.dtype, device=gate_up.device)
    check_triton_shrink(act, weights, segments)
    y = torch.empty(
        num_tokens,
        weights.a_offsets.shape[1],
        segments.max_rank,
        dtype=torch.float32,
        device=gate_up.device,
    )
    if act.numel() == 0 or y.numel() == 0:
        return gated_activation(gate_up, activation), y
    _gated_activation_shrink_kernel[(num_tokens,)](
        gate_up,
        act,
        intermediate,
        gate_up.stride(0),
        *token_shrink_arguments(weights, tiles, y),
        GELU_TANH=activation == "gelu_pytorch_tanh",
        BLOCK_N=column_block(intermediate),
        BLOCK_R=DECODE_BLOCK_R,
        BLOCK_K=DECODE_BLOCK_K,
        num_warps=4,  # the plain activation's and the decode shrink's
        num_stages=3,
    )
    return act, y
