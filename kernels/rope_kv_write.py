"""RoPE on q and k fused with the KV write: one launch where torch launches about fifteen.

Semantics (ops.RopeWriteKV): out = rope(query); kv[s // B, 0, s % B] = rope(key[t]);
kv[s // B, 1, s % B] = value[t]; s = slot_mapping[t], where

    rope([x1, x2, rest]) = [x1 cos - x2 sin, x2 cos + x1 sin, rest]

over each head's first rotary_dim = 2 * half dimensions (rest: partial rotary, copied).
Each product and each sum is rounded to the model's dtype where torch's half-precision
ops round them (transformers' `q * cos + rotate_half(q) * sin`), so float16 results are
torch's bit for bit; float32 ones agree to rounding.

Grid: (token, q or k or v). One program moves one token's heads of one of the three,
`[heads, head_dim]` (a few KB): q rotated into `out`, k rotated and v copied into their
page of the pool through `kv`'s strides (one layer's view, whose page stride is the page
size). Rotated k never goes back to memory other than the pool: attention reads it from
there. This is the prefill path: a decode step rotates and writes inside its attention
launch instead (rope_kv_attention.py), through the same rounding helper
(triton_utils.rope_rotate). Inputs are read through their token and head strides (views of
the fused qkv output, or the normed q and k of Qwen3 and Gemma 3). A slot < 0 marks a
padding token: its K and V are not written; its q is still rotated (attention reads it,
then it is discarded).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraserve.kernels.checks import check_rope, check_same_device, check_write_kv
from loraserve.kernels.triton_utils import rope_rotate


@triton.jit
def _rope_kv_write_kernel(
    query_ptr,  # [num_tokens, num_heads, head_dim]
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_ptr,  # [num_tokens, 2, half], cos then sin of each token's position
    kv_ptr,  # one layer's [num_pages, 2, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int64, page * block_size + position in the page
    out_ptr,  # [num_tokens, num_heads, head_dim] contiguous, rotated q
    num_heads,
    num_kv_heads,
    head_dim,
    half,  # rotary_dim // 2
    block_size,
    stride_query_token,
    stride_query_head,
    stride_key_token,
    stride_key_head,
    stride_value_token,
    stride_value_head,
    stride_cos_sin_token,
    stride_cos_sin_which,  # between cos and sin
    stride_kv_page,
    stride_kv_which,  # between K and V
    stride_kv_position,
    stride_kv_head,
    BLOCK_H: tl.constexpr,  # power of two >= num_heads and num_kv_heads
    BLOCK_HALF: tl.constexpr,  # power of two >= half
    BLOCK_D: tl.constexpr,  # power of two >= head_dim
    PARTIAL: tl.constexpr,  # rotary_dim < head_dim: the rest is copied
):
    token = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)  # 0: q, 1: k, 2: v
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if (which > 0) & (slot < 0):
        return
    heads = tl.arange(0, BLOCK_H)[:, None]
    page, position = slot // block_size, slot % block_size
    pool_rows = kv_ptr + page * stride_kv_page + (which - 1) * stride_kv_which
    pool_rows += position * stride_kv_position + heads * stride_kv_head
    # Outside the branches: Triton may make an argument equal to 1 a constant, whose type
    # differs from an int's, and a variable must have one type in every branch.
    num_rows = tl.where(which == 0, num_heads, num_kv_heads)
    if which == 0:
        rows = query_ptr + token * stride_query_token + heads * stride_query_head
        targets = out_ptr + (token * num_heads + heads) * head_dim
    elif which == 1:
        rows = key_ptr + token * stride_key_token + heads * stride_key_head
        targets = pool_rows
    else:
        rows = value_ptr + token * stride_value_token + heads * stride_value_head
        targets = pool_rows
    dtype = out_ptr.dtype.element_ty
    dims = tl.arange(0, BLOCK_D)[None, :]
    if which == 2:  # v: copied as it is
        mask = (heads < num_rows) & (dims < head_dim)
        tl.store(targets + dims, tl.load(rows + dims, mask=mask), mask=mask)
    else:
        halves = tl.arange(0, BLOCK_HALF)[None, :]
        mask = (heads < num_rows) & (halves < half)
        x1 = tl.load(rows + halves, mask=mask).to(tl.float32)  # [BLOCK_H, BLOCK_HALF]
        x2 = tl.load(rows + half + halves, mask=mask).to(tl.float32)
        angles = cos_sin_ptr + token * stride_cos_sin_token + halves
        cos = tl.load(angles, mask=halves < half).to(tl.float32)  # [1, BLOCK_HALF]
        sin = tl.load(angles + stride_cos_sin_which, mask=halves < half).to(tl.float32)
        first = rope_rotate(x1, x2, cos, -sin, dtype)
        second = rope_rotate(x2, x1, cos, sin, dtype)
        tl.store(targets + halves, first.to(dtype), mask=mask)
        tl.store(targets + half + halves, second.to(dtype), mask=mask)
        if PARTIAL:  # the dimensions past rotary_dim, copied
            mask = (heads < num_rows) & (dims >= 2 * half) & (dims < head_dim)
            tl.store(targets + dims, tl.load(rows + dims, mask=mask), mask=mask)


def rope_write_kv(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos_sin: torch.Tensor,
    kv: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """ops.RopeWriteKV. query, key, value, cos_sin and kv share a float dtype (unit stride on
    their last axis); all on one device."""
    check_same_device(query=query, key=key, value=value, cos_sin=cos_sin, kv=kv)
    check_write_kv(kv, key, value, slot_mapping)
    num_tokens, num_heads, head_dim, half = check_rope(query, key, value, cos_sin, kv)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0:
        return out
    num_kv_heads = kv.shape[3]
    block_h = triton.next_power_of_2(max(num_heads, num_kv_heads))
    block_d = triton.next_power_of_2(head_dim)
    _rope_kv_write_kernel[(num_tokens, 3)](
        query,
        key,
        value,
        cos_sin,
        kv,
        slot_mapping,
        out,
        num_heads,
        num_kv_heads,
        head_dim,
        half,
        kv.shape[2],
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        cos_sin.stride(0),
        cos_sin.stride(1),
        kv.stride(0),
        kv.stride(1),
        kv.stride(2),
        kv.stride(3),
        BLOCK_H=block_h,
        BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_D=block_d,
        PARTIAL=2 * half < head_dim,
        # A 32 x 128 block is 4096 elements: 8 warps give each thread 16 of them.
        num_warps=8 if block_h * block_d >= 4096 else 4,
    )
    return out
