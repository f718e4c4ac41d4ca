"""KV write: scatter the new tokens' keys and values into their pages of the pool.

Semantics: kv[s // B, 0, s % B] = key[t]; the same for value at 1; s = slot_mapping[t].

Grid: (token, K or V). One program moves one token's `[num_kv_heads, head_dim]`
block (a few KB), reading key/value through their strides (the engine passes
`v` as a column slice of the fused qkv output) and writing through kv's strides
(one layer's view of the pool, whose page stride is the page size, not the KV
block size). A negative slot marks a padding token and is skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraserve.kernels.checks import FLOAT_DTYPES, check_same_device, check_write_kv


@triton.jit
def _kv_write_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    kv_ptr,  # one layer's [num_pages, 2, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int64, page * block_size + position in the page
    num_kv_heads,
    head_dim,
    block_size,
    stride_key_token,
    stride_key_head,
    stride_value_token,
    stride_value_head,
    stride_kv_page,
    stride_kv_which,  # between K and V
    stride_kv_position,
    stride_kv_head,
    BLOCK_H: tl.constexpr,  # power of two >= num_kv_heads
    BLOCK_D: tl.constexpr,  # power of two >= head_dim
):
    token = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)  # 0: key, 1: value
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads < num_kv_heads)[:, None] & (dims < head_dim)[None, :]
    if which == 0:
        source = key_ptr + token * stride_key_token + heads[:, None] * stride_key_head
    else:
        source = value_ptr + token * stride_value_token + heads[:, None] * stride_value_head
    block = tl.load(source + dims[None, :], mask=mask)
    page, position = slot // block_size, slot % block_size
    target = (
        kv_ptr + page * stride_kv_page + which * stride_kv_which + position * stride_kv_position
    )
    target += heads[:, None] * stride_kv_head + dims[None, :]
    tl.store(target, block.to(kv_ptr.dtype.element_ty), mask=mask)


def write_kv(
    kv: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """ops.WriteKV. kv of a float dtype (any strides but a unit one along head_dim), all on
    one device."""
    check_same_device(kv=kv, key=key, value=value)
    check_write_kv(kv, key, value, slot_mapping)
    if kv.dtype not in FLOAT_DTYPES:
        raise ValueError(f"kv must be a float tensor, got {kv.dtype}")
    num_kv_heads, head_dim = kv.shape[3], kv.shape[4]
    if key.shape[0] == 0:
        return
    _kv_write_kernel[(key.shape[0], 2)](
        key,
        value,
        kv,
        slot_mapping,
        num_kv_heads,
        head_dim,
        kv.shape[2],
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        kv.stride(0),
        kv.stride(1),
        kv.stride(2),
        kv.stride(3),
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        # A 32 x 128 block is 4096 elements: 8 warps give each thread 16 of them.
        num_warps=8 if num_kv_heads * head_dim >= 4096 else 4,
    )
