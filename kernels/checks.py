"""Argument checks shared by the Triton and native wrappers: a ValueError naming the bad
argument and what is allowed, before any pointer reaches a kernel.

Shapes, strides and index dtypes are the same for every backend (kernels/ops.py); each
wrapper adds what only its backend needs: native_checks.py (float32 on the CPU, int32
metadata), the Triton wrappers (one device, contiguity, a float dtype shared by the inputs).
"""

from __future__ import annotations

import torch

from loraserve.kernels.ops import LoraWeights

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_same_device(**tensors: torch.Tensor) -> None:
    """Raise ValueError unless every tensor lives on the same device."""
    devices = {name: tensor.device for name, tensor in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


def check_shrink(x: torch.Tensor, weights: LoraWeights) -> None:
    """lora_shrink's x, and the A side of its weights."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [num_tokens, in_dim] with unit column stride, got {x.shape}")
    check_table(weights.a_offsets, weights.ranks, x.device)


def check_expand(out: torch.Tensor, y: torch.Tensor, weights: LoraWeights) -> None:
    """lora_expand's out and y, and the B side of its weights."""
    if out.dim() != 2 or out.stride(1) != 1:
        raise ValueError(f"out must be [num_tokens, out_dim], unit column stride, got {out.shape}")
    if y.dim() != 3 or y.shape[0] != out.shape[0] or not y.is_contiguous():
        raise ValueError(
            f"y must be contiguous [{out.shape[0]}, num_slices, max_rank], got {y.shape}"
        )
    if y.dtype != torch.float32:
        raise ValueError(f"y must be float32 (lora_shrink's output), got {y.dtype}")
    check_table(weights.b_offsets, weights.ranks, out.device)
    slices = weights.slices
    if weights.b_offsets.shape[1] != y.shape[1] or len(slices.starts) != y.shape[1] + 1:
        raise ValueError(
            f"y, b_offsets and slice_starts {slices.starts} disagree on the number of slices: "
            f"{y.shape[1]}, {weights.b_offsets.shape[1]}"
        )
    if slices.starts[-1] != out.shape[1] or slices.tensor.device != out.device:
        raise ValueError(
            f"slice_starts {slices.starts} on {slices.tensor.device} must end at out's width "
            f"{out.shape[1]}, on out's device {out.device}"
        )
    check_dora(out, weights)


def check_dora(out: torch.Tensor, weights: LoraWeights) -> None:
    """DoRA's g offset table (b_offsets' shape) and the bias (`[out_dim]`), when given."""
    g_offsets, bias = weights.g_offsets, weights.bias
    if g_offsets is not None and (
        g_offsets.dtype != torch.int64
        or g_offsets.shape != weights.b_offsets.shape
        or g_offsets.device != out.device
    ):
        raise ValueError(
            f"g_offsets must be int64 {tuple(weights.b_offsets.shape)} on {out.device}, "
            f"got {g_offsets.dtype} {tuple(g_offsets.shape)} on {g_offsets.device}"
        )
    if bias is not None and (
        bias.shape != (out.shape[1],) or bias.device != out.device or not bias.is_contiguous()
    ):
        raise ValueError(
            f"bias must be contiguous [{out.shape[1]}] on {out.device}, "
            f"got {tuple(bias.shape)} on {bias.device}"
        )


def check_table(offsets: torch.Tensor, ranks: torch.Tensor, device: torch.device) -> None:
    """An offset table and the rank table, on the activations' device."""
    if offsets.dim() != 2 or offsets.dtype != torch.int64 or offsets.device != device:
        raise ValueError(
            f"offsets must be int64 [num_slots, num_slices] on {device}, "
            f"got {offsets.dtype} {tuple(offsets.shape)} on {offsets.device}"
        )
    if ranks.shape != offsets.shape or ranks.dtype != torch.int32 or ranks.device != device:
        raise ValueError(
            f"ranks must be int32 {tuple(offsets.shape)} on {device}, "
            f"got {ranks.dtype} {tuple(ranks.shape)} on {ranks.device}"
        )


def check_segments(starts: torch.Tensor, slots: torch.Tensor) -> None:
    if slots.dim() != 1 or starts.shape != (slots.shape[0] + 1,):
        raise ValueError(
            f"segment_starts must have one more entry than segment_slots, got "
            f"{tuple(starts.shape)} and {tuple(slots.shape)}"
        )


def check_kv(kv: torch.Tensor) -> None:
    if kv.dim() != 5 or kv.stride(4) != 1 or kv.shape[1] != 2:
        raise ValueError(
            "kv must be one layer's [num_pages, 2, block_size, num_kv_heads, head_dim] with "
            f"unit head_dim stride, got {tuple(kv.shape)}"
        )


def check_write_kv(
    kv: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """write_kv's arguments: key and value of kv's heads, a slot for each token."""
    check_kv(kv)
    heads = kv.shape[3:]
    for name, tensor in (("key", key), ("value", value)):
        if tensor.shape != (key.shape[0], *heads) or tensor.stride(2) != 1:
            raise ValueError(
                f"{name} must be [num_tokens, {heads[0]}, {heads[1]}], unit stride on head_dim, "
                f"got {tensor.shape}"
            )
    if (
        slot_mapping.shape != (key.shape[0],)
        or slot_mapping.dtype != torch.int64
        or slot_mapping.device != key.device
    ):
        raise ValueError(
            f"slot_mapping must be int64 [{key.shape[0]}] on {key.device}, got "
            f"{slot_mapping.dtype} {tuple(slot_mapping.shape)} on {slot_mapping.device}"
        )


def check_attention(query: torch.Tensor, kv: torch.Tensor) -> tuple[int, int, int]:
    """paged_attention's query and kv; (num_tokens, num_heads, head_dim)."""
    check_kv(kv)
    if query.dim() != 3 or query.stride(2) != 1:
        raise ValueError(
            f"query must be [num_tokens, num_heads, head_dim], unit stride on head_dim, "
            f"got {tuple(query.shape)}"
        )
    num_tokens, num_heads, head_dim = query.shape
    if head_dim != kv.shape[4] or num_heads % kv.shape[3] != 0:
        raise ValueError(
            f"query heads {tuple(query.shape[1:])} do not match kv {tuple(kv.shape)}: "
            "head_dim must agree and num_heads be a multiple of num_kv_heads"
        )
    return num_tokens, num_heads, head_dim


def check_sequences(
    block_tables: torch.Tensor, query_starts: torch.Tensor, context_lens: torch.Tensor
) -> None:
    """The step's sequence metadata agree on the number of sequences."""
    num_seqs = context_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"block_tables must be [num_seqs, max_blocks] with context_lens [num_seqs], got "
            f"{tuple(block_tables.shape)} and {tuple(context_lens.shape)}"
        )
    if query_starts.shape != (num_seqs + 1,):
        raise ValueError(
            f"query_starts must be [num_seqs + 1] with context_lens [num_seqs], got "
            f"{tuple(query_starts.shape)} and {tuple(context_lens.shape)}"
        )


def check_rope(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos_sin: torch.Tensor,
    kv: torch.Tensor,
) -> tuple[int, int, int, int]:
    """rope_write_kv's query, key, value, cos_sin and kv (write_kv's checks aside);
    (num_tokens, num_heads, head_dim, half) once they agree."""
    if query.dim() != 3 or query.shape[0] != key.shape[0] or query.shape[2] != key.shape[2]:
        raise ValueError(
            f"query must be [{key.shape[0]}, num_heads, {key.shape[2]}], got {tuple(query.shape)}"
        )
    num_tokens, num_heads, head_dim = query.shape
    if query.stride(2) != 1 or num_heads % kv.shape[3] != 0:
        raise ValueError(
            f"query {tuple(query.shape)} needs unit stride on head_dim and a multiple of "
            f"kv's {kv.shape[3]} heads"
        )
    if (
        cos_sin.dim() != 3
        or cos_sin.shape[:2] != (num_tokens, 2)
        or not 0 < 2 * cos_sin.shape[2] <= head_dim
        or cos_sin.stride(2) != 1
    ):
        raise ValueError(
            f"cos_sin must be [{num_tokens}, 2, rotary_dim // 2] with rotary_dim <= {head_dim}"
            f" and unit stride on its last axis, got {tuple(cos_sin.shape)}"
        )
    dtypes = {query.dtype, key.dtype, value.dtype, cos_sin.dtype, kv.dtype}
    if len(dtypes) != 1 or query.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"query, key, value, cos_sin and kv must share a float dtype, got {query.dtype}, "
            f"{key.dtype}, {value.dtype}, {cos_sin.dtype}, kv {kv.dtype}"
        )
    return num_tokens, num_heads, head_dim, cos_sin.shape[2]
