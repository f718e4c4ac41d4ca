"""Combine the partial results of split-KV paged attention (flash-decoding's second pass).

Semantics: out[t, h] = sum_p w_p * acc[p, t, h] / sum_p w_p * l[p, t, h], w_p = 2^(m[p, t, h] - max_p m).

`paged_attention` splits a long context into partitions when the batch alone
would leave the GPU idle; each partition p leaves, per query row, its running
maximum m (base-2 logits), its sum of exponentials l and its unnormalised
output acc. A partition holding no key of a row leaves m = -inf, l = 0: weight 0.
Grid: (token, head); one program reads all partitions of one row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _combine_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim] attention output
    partial_out_ptr,  # [num_splits, num_tokens, num_heads, head_dim] float32 unnormalised
    partial_max_ptr,  # [num_splits, num_tokens, num_heads] float32 running max (log2 units)
    partial_sum_ptr,  # [num_splits, num_tokens, num_heads] float32 sum of exponentials
    num_splits,
    num_heads,
    head_dim,
    stride_split,  # elements between partitions of partial_max / partial_sum
    stride_out_token,
    stride_out_head,
    BLOCK_SPLITS: tl.constexpr,  # power of two >= num_splits
    BLOCK_D: tl.constexpr,  # power of two >= head_dim
):
    row = tl.program_id(0).to(tl.int64) * num_heads + tl.program_id(1)  # (token, head)
    splits = tl.arange(0, BLOCK_SPLITS)
    split_mask = splits < num_splits
    dims = tl.arange(0, BLOCK_D)
    maxima = tl.load(
        partial_max_ptr + splits * stride_split + row, mask=split_mask, other=float("-inf")
    )
    sums = tl.load(partial_sum_ptr + splits * stride_split + row, mask=split_mask, other=0.0)
    partial_ptrs = (
        partial_out_ptr + (splits[:, None] * stride_split + row) * head_dim + dims[None, :]
    )
    partials = tl.load(
        partial_ptrs, mask=split_mask[:, None] & (dims < head_dim)[None, :], other=0.0
    )
    overall_max = tl.max(maxima, axis=0)
    weights = tl.where(maxima == float("-inf"), 0.0, tl.exp2(maxima - overall_max))
    total = tl.sum(weights * sums, axis=0)
    result = tl.sum(weights[:, None] * partials, axis=0) / total
    out = (
        out_ptr
        + tl.program_id(0).to(tl.int64) * stride_out_token
        + tl.program_id(1) * stride_out_head
    )
    tl.store(out + dims, result.to(out_ptr.dtype.element_ty), mask=dims < head_dim)


def combine_partitions(
    out: torch.Tensor,
    partial_out: torch.Tensor,
    partial_max: torch.Tensor,
    partial_sum: torch.Tensor,
) -> None:
    """Semantics: out[t, h] = sum_p w_p * acc[p, t, h] / sum_p w_p * l[p, t, h].

    out:         [num_tokens, num_heads, head_dim], unit head_dim stride, written
    partial_out: [num_splits, num_tokens, num_heads, head_dim] float32 contiguous
    partial_max: [num_splits, num_tokens, num_heads] float32 contiguous
    partial_sum: [num_splits, num_tokens, num_heads] float32 contiguous
    """
    num_splits, num_tokens, num_heads, head_dim = partial_out.shape
    if out.shape != (num_tokens, num_heads, head_dim) or out.stride(2) != 1:
        raise ValueError(f"out must be [{num_tokens}, {num_heads}, {head_dim}], got {out.shape}")
    for name, tensor in (("partial_max", partial_max), ("partial_sum", partial_sum)):
        if tensor.shape != partial_out.shape[:3] or not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous {tuple(partial_out.shape[:3])}")
    if not partial_out.is_contiguous() or num_tokens == 0:
        raise ValueError("partial_out must be contiguous and hold at least one token")
    _combine_kernel[(num_tokens, num_heads)](
        out,
        partial_out,
        partial_max,
        partial_sum,
        num_splits,
        num_heads,
        head_dim,
        num_tokens * num_heads,
        out.stride(0),
        out.stride(1),
        BLOCK_SPLITS=triton.next_power_of_2(num_splits),
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=1 if head_dim <= 128 else 2,  # one row of at most 128 values per program
    )
