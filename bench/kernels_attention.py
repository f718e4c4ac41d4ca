"""Paged attention, decode at contexts 512/2048/4096 and batches 1..256, and prefill: the
Triton kernel against the torch reference (small cases) and torch's
`scaled_dot_product_attention` on pre-gathered contiguous K/V. Run by bench/kernels.py.

Bytes counted are those that must move: the K/V of every sequence plus queries and outputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from loraserve.models.arch import ModelArch

from .kernel_timing import DECODE_BATCHES, DTYPE, Result, Timer, make_result

CONTEXTS = (512, 2048, 4096)
BLOCK_SIZE = 16
REFERENCE_MAX_KEYS = 32768  # the torch attention reference gathers K/V in float32: keep it small


def attention_functions(
    model: ModelArch, query_len: int, context_len: int, num_seqs: int
) -> tuple[dict[str, Callable[[], object]], int]:
    """(Triton / reference / SDPA on gathered K/V, bytes that must move) for equal sequences."""
    import torch.nn.functional as F

    from loraserve.kernels import reference
    from loraserve.kernels.ops import Scores, SequenceBatch
    from loraserve.kernels.paged_attention import paged_attention

    kv_heads, head_dim = model.num_kv_heads, model.head_dim
    blocks = -(-context_len // BLOCK_SIZE)
    num_pages = num_seqs * blocks
    kv_numel = 2 * BLOCK_SIZE * kv_heads * head_dim
    pool = torch.randn(num_pages, kv_numel + 256, device="cuda", dtype=DTYPE)  # pages wider than KV
    kv_pages = pool[:, :kv_numel].view(num_pages, 1, 2, BLOCK_SIZE, kv_heads, head_dim)
    block_tables = torch.randperm(num_pages, device="cuda").view(num_seqs, blocks).int()
    query = torch.randn(num_seqs * query_len, model.num_heads, head_dim, device="cuda", dtype=DTYPE)
    query_starts = torch.arange(0, num_seqs + 1, dtype=torch.int32, device="cuda") * query_len
    context_lens = torch.full((num_seqs,), context_len, dtype=torch.int32, device="cuda")
    seqs = SequenceBatch(
        query_starts=query_starts, context_lens=context_lens, block_tables=block_tables
    )
    args = (query, kv_pages[:, 0], seqs, Scores(head_dim**-0.5))

    gathered = kv_pages[block_tables.long(), 0]  # [seqs, blocks, 2, block_size, kv_heads, head_dim]
    gathered = gathered.permute(2, 0, 4, 1, 3, 5).reshape(2, num_seqs, kv_heads, -1, head_dim)
    key, value = (
        gathered[0, :, :, :context_len].contiguous(),
        gathered[1, :, :, :context_len].contiguous(),
    )
    del gathered
    dense_query = query.view(num_seqs, query_len, model.num_heads, head_dim).transpose(1, 2)
    positions = torch.arange(context_len, device="cuda")
    mask = positions[None, :] <= positions[context_len - query_len :, None]  # [query_len, context]

    functions: dict[str, Callable[[], object]] = {
        "triton": lambda: paged_attention(*args),
        # Decode and plain prefill take SDPA's flash path; extend needs the offset causal mask.
        "baseline": lambda: F.scaled_dot_product_attention(
            dense_query,
            key,
            value,
            attn_mask=mask if 1 < query_len < context_len else None,
            is_causal=1 < query_len == context_len,
            enable_gqa=True,
        ),
    }
    if num_seqs * context_len <= REFERENCE_MAX_KEYS:
        functions["reference"] = lambda: reference.paged_attention(*args)
    kv_bytes = num_seqs * context_len * 2 * kv_heads * head_dim * pool.element_size()
    return functions, kv_bytes + 2 * query.numel() * query.element_size()


def bench_attention(
    model_name: str, model: ModelArch, copy_gbs: float, timer: Timer, quick: bool
) -> list[Result]:
    shapes = [(1, context, batch) for context in CONTEXTS for batch in DECODE_BATCHES]
    shapes += [(256, 256, 8), (512, 2048, 8)]  # prefill 8 x 256; extend 8 x 512 new on 1536 cached
    if quick:
        shapes = [(1, 512, 1), (1, 4096, 256), (256, 256, 8)]
    results = []
    for query_len, context_len, num_seqs in shapes:
        functions, total_bytes = attention_functions(model, query_len, context_len, num_seqs)
        times = timer.measure(functions)
        kind = "decode" if query_len == 1 else "prefill"
        shape = f"{num_seqs} seq x {query_len} q, ctx {context_len}"
        params = dict(num_seqs=num_seqs, query_len=query_len, context_len=context_len)
        results.append(
            make_result(
                f"attention-{kind}", model_name, shape, times, total_bytes, copy_gbs, params
            )
        )
        del functions
    return results
