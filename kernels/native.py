"""The native CPU kernels: C (OpenMP) LoRA shrink/expand, KV write and paged attention.

Semantics, argument conventions and results are those of kernels/reference.py;
these wrappers check shapes, dtypes and devices (ValueError) and hand pointers and
strides to the C code (`native_lora.c`, `native_attention.c`), which reads adapter
weights and K/V in place in the pool through the offset tables and block tables:
no gather, no copy, no loop over segments or sequences in Python. float32 on the
CPU only. The library is compiled on first use (kernels/native_build.py).

Why C: on a CPU at the sizes loraserve serves, a step's time went to the number of
torch calls (one BLAS call per segment and slice, ~5 us each, and K/V gathers
through the block tables), not to arithmetic. One C call per projection group or
per attention layer costs a few microseconds of Python and ctypes, then only the
FLOPs and the bytes the batch needs (bench/cpu_kernels.py measures both).

Long prefills (more than LONG_PREFILL_TOKENS queries in one sequence) are where
torch's flash-attention kernel beats the C loop: those few sequences go through
SDPA over a gather of that one sequence's K/V (a sliding window as an explicit mask);
every other sequence of the step (decodes, extends, short prefills) is done in one C
call. With soft-capped scores (Gemma 2), which SDPA cannot compute, all stay in C.

Threads: each call runs on `torch.get_num_threads()` OpenMP threads of the runtime
torch loaded (the library links the same libgomp), read at every call, so
`torch.set_num_threads` governs these kernels as it does torch's own. Every output
element is computed by one thread: results do not depend on the thread count.
"""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from loraserve.kernels import native_build
from loraserve.kernels import native_checks as checks

__all__ = ["available", "lora_expand", "lora_shrink", "paged_attention", "write_kv"]

# Queries of one sequence above which torch's SDPA (its flash kernel) beats the C loop, the
# gather of that sequence's K/V included: measured crossovers 512-1024 at head_dim 64 and 128
# on 2 threads, 256-512 on one (bench/cpu_kernels.py, bench/results/README.md).
LONG_PREFILL_TOKENS = 512
FLOAT_BYTES = 4

# The C functions' parameters, one letter each (see their comments in the .c files):
# p pointer, i int64_t, f float, n int (the number of OpenMP threads).
_SIGNATURES = {
    "loraserve_lora_shrink": "piiipipiipiiiippiipn",
    "loraserve_lora_expand": "piipipipiipiiiipppin",
    "loraserve_write_kv": "piiiiiiiipiipiipiin",
    "loraserve_paged_attention": "piipiiiiiiiiipiiippiififipiin",
}
_CTYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int64, "f": ctypes.c_float, "n": ctypes.c_int}
_library: ctypes.CDLL | None = None


def available() -> bool:
    """Whether the native kernels can run here (builds the library on the first call)."""
    try:
        _native()
    except native_build.NativeKernelsUnavailable:
        return False
    return True


def _native() -> ctypes.CDLL:
    global _library
    if _library is None:
        library = native_build.load()
        for name, argtypes in _SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes = [_CTYPES[letter] for letter in argtypes]
            function.restype = ctypes.c_int
        _library = library
    return _library


def lora_shrink(
    x: torch.Tensor,
    pool: torch.Tensor,
    a_offsets: torch.Tensor,
    ranks: torch.Tensor,
    segment_starts: torch.Tensor,
    segment_slots: torch.Tensor,
    max_rank: int,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Semantics: y[t, i, :r] = x[t] @ A[slot(t), i].T, for each token t and slice i.

    x:              [num_tokens, in_dim] float32, unit column stride (any row stride)
    pool:           [num_pages, page_numel] float32 contiguous
    a_offsets:      [num_slots, num_slices] int64, element offset of A (`[r, in_dim]`); any strides
    ranks:          [num_slots, num_slices] int32, 0 where the slice is not targeted; any strides
    segment_starts: [num_segments + 1] int32 (others are converted), from 0 to num_tokens
    segment_slots:  [num_segments] int32, NO_ADAPTER segments get y = 0
    max_rank:       at least every rank used by the batch
    out:            optional [num_tokens, num_slices, max_rank] float32 contiguous buffer for y
    returns y:      [num_tokens, num_slices, max_rank] float32, zero beyond each rank
    """
    checks.check_cpu_float32(x=x, pool=pool)
    checks.check_table(a_offsets, ranks)
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [num_tokens, in_dim] with unit column stride, got {x.shape}")
    starts, slots = checks.segments(segment_starts, segment_slots)
    num_tokens, in_dim = x.shape
    num_slots, num_slices = a_offsets.shape
    shape = (num_tokens, num_slices, max_rank)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    elif out.shape != shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor {shape}, got {out.shape}")
    status = _native().loraserve_lora_shrink(
        x.data_ptr(), x.stride(0), num_tokens, in_dim, pool.data_ptr(), pool.numel(),
        a_offsets.data_ptr(), *a_offsets.stride(), ranks.data_ptr(), *ranks.stride(),
        num_slots, num_slices, starts.data_ptr(), slots.data_ptr(), slots.shape[0],
        max_rank, out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status:
        checks.raise_lora_error(status, starts, slots, a_offsets, ranks, max_rank, pool)
    return out


def lora_expand(
    out: torch.Tensor,
    y: torch.Tensor,
    pool: torch.Tensor,
    b_offsets: torch.Tensor,
    ranks: torch.Tensor,
    segment_starts: torch.Tensor,
    segment_slots: torch.Tensor,
    slice_starts: Sequence[int] | torch.Tensor,
) -> None:
    """Semantics: out[t, c_i:c_{i+1}] += y[t, i, :r] @ B[slot(t), i], for each token t and slice i.

    out:            [num_tokens, slice_starts[-1]] float32, unit column stride, updated in place
    y:              [num_tokens, num_slices, max_rank] float32 contiguous (from lora_shrink)
    pool:           [num_pages, page_numel] float32 contiguous
    b_offsets:      [num_slots, num_slices] int64, element offset of B (`[r, out_i]`); any strides
    ranks:          [num_slots, num_slices] int32, 0 where the slice is not targeted; any strides
    segment_starts: [num_segments + 1] int32 (others are converted), from 0 to num_tokens
    segment_slots:  [num_segments] int32, NO_ADAPTER segments leave out untouched
    slice_starts:   [num_slices + 1] column where each slice's output begins in `out`
    """
    checks.check_cpu_float32(out=out, y=y, pool=pool)
    checks.check_table(b_offsets, ranks)
    if out.dim() != 2 or out.stride(1) != 1:
        raise ValueError(f"out must be [num_tokens, out_dim], unit column stride, got {out.shape}")
    num_slots, num_slices = b_offsets.shape
    if y.dim() != 3 or y.shape[:2] != (out.shape[0], num_slices) or not y.is_contiguous():
        raise ValueError(
            f"y must be contiguous [{out.shape[0]}, {num_slices}, max_rank], got {y.shape}"
        )
    columns = checks.slice_starts(slice_starts, num_slices, out.shape[1])
    starts, slots = checks.segments(segment_starts, segment_slots)
    status = _native().loraserve_lora_expand(
        out.data_ptr(), out.stride(0), out.shape[0], y.data_ptr(), y.shape[2], pool.data_ptr(),
        pool.numel(), b_offsets.data_ptr(), *b_offsets.stride(), ranks.data_ptr(),
        *ranks.stride(), num_slots, num_slices, columns.data_ptr(), starts.data_ptr(),
        slots.data_ptr(), slots.shape[0], torch.get_num_threads(),
    )  # fmt: skip
    if status:
        checks.raise_lora_error(status, starts, slots, b_offsets, ranks, y.shape[2], pool)


def write_kv(
    kv_pages: torch.Tensor,
    layer: int,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Semantics: kv_pages[s // B, layer, 0, s % B] = key[t]; same for value at 1; s = slot_mapping[t].

    kv_pages:     [num_pages, num_layers, 2, block_size, num_kv_heads, head_dim] float32, any
                  strides but a unit one along head_dim
    key, value:   [num_tokens, num_kv_heads, head_dim] float32, unit stride along head_dim
    slot_mapping: [num_tokens] int64, page * block_size + position in the page; < 0 = skip
    """
    checks.check_cpu_float32(kv_pages=kv_pages, key=key, value=value)
    checks.check_kv_pages(kv_pages, layer)
    heads = kv_pages.shape[4:]
    for name, tensor in (("key", key), ("value", value)):
        if tensor.shape != (key.shape[0], *heads) or tensor.stride(2) != 1:
            raise ValueError(
                f"{name} must be [num_tokens, {heads[0]}, {heads[1]}], got {tensor.shape}"
            )
    if slot_mapping.shape != (key.shape[0],) or slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping must be int64 [{key.shape[0]}], got {slot_mapping.dtype}")
    if not slot_mapping.is_cpu:
        raise ValueError(f"slot_mapping must be on the CPU, got {slot_mapping.device}")
    status = _native().loraserve_write_kv(
        _layer_pointer(kv_pages, layer), *_kv_strides(kv_pages), kv_pages.shape[0],
        kv_pages.shape[3], *heads, key.data_ptr(), key.stride(0), key.stride(1),
        value.data_ptr(), value.stride(0), value.stride(1), slot_mapping.data_ptr(),
        slot_mapping.stride(0), key.shape[0], torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise ValueError(
            f"slot_mapping must be < num_pages * block_size = "
            f"{kv_pages.shape[0] * kv_pages.shape[3]}, got max {int(slot_mapping.max())}"
        )


def paged_attention(
    query: torch.Tensor,
    kv_pages: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    query_starts: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    window: int = 0,
    softcap: float = 0.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Semantics: out[t] = softmax(cap(q[t] @ K[seq(t), w(t):p(t)+1].T * scale)) @ V[seq(t), w(t):p(t)+1].

    Causal, GQA, any number of query tokens per sequence, a sliding window (`window` > 0:
    the last `window` keys) and soft-capped scores (`softcap` > 0), as reference.paged_attention.
    query:        [num_tokens, num_heads, head_dim] float32, unit stride along head_dim (a
                  view of the fused qkv buffer is fine)
    kv_pages:     [num_pages, num_layers, 2, block_size, num_kv_heads, head_dim] float32, any
                  strides but a unit one along head_dim
    block_tables: [num_seqs, max_blocks] int32, pages of each sequence in order; any strides
    query_starts: [num_seqs + 1] int32 (others are converted), from 0 to num_tokens
    context_lens: [num_seqs] int32 (others are converted), at most max_blocks * block_size
    out:          optional [num_tokens, num_heads, head_dim] float32, unit stride on head_dim
    returns:      out, or a new contiguous tensor
    """
    checks.check_cpu_float32(query=query, kv_pages=kv_pages)
    checks.check_kv_pages(kv_pages, layer)
    checks.check_window_and_softcap(window, softcap)
    num_tokens, num_heads, head_dim = checks.check_query(query, kv_pages)
    if out is None:
        out = torch.empty(query.shape, dtype=torch.float32)
    elif out.shape != query.shape or out.dtype != torch.float32 or out.stride(2) != 1:
        raise ValueError(f"out must be float32 {tuple(query.shape)}, got {out.shape} {out.dtype}")
    tables = checks.int32(block_tables, "block_tables", contiguous=False)
    starts, lens = (
        checks.int32(query_starts, "query_starts"),
        checks.int32(context_lens, "context_lens"),
    )
    if (
        tables.dim() != 2
        or tables.shape[0] != lens.shape[0]
        or starts.shape != (lens.shape[0] + 1,)
    ):
        raise ValueError(
            f"block_tables [num_seqs, max_blocks], query_starts [num_seqs + 1] and context_lens "
            f"[num_seqs] disagree: {tuple(tables.shape)}, {tuple(starts.shape)}, {tuple(lens.shape)}"
        )
    # SDPA cannot soft-cap: with a cap, long prefills stay in C too.
    max_query_len = LONG_PREFILL_TOKENS if softcap == 0 else num_tokens
    status = _native().loraserve_paged_attention(
        query.data_ptr(), query.stride(0), query.stride(1), _layer_pointer(kv_pages, layer),
        *_kv_strides(kv_pages), kv_pages.shape[0], kv_pages.shape[3], num_heads,
        kv_pages.shape[4], head_dim, tables.data_ptr(), *tables.stride(), tables.shape[1],
        starts.data_ptr(), lens.data_ptr(), lens.shape[0], num_tokens, scale, window, softcap,
        max_query_len, out.data_ptr(), out.stride(0), out.stride(1), torch.get_num_threads(),
    )  # fmt: skip
    if status:
        checks.raise_attention_error(status, starts, lens, tables, kv_pages)
    if num_tokens > max_query_len:
        _long_prefills(query, kv_pages, layer, tables, starts, lens, scale, window, out)
    return out


def _long_prefills(
    query: torch.Tensor,
    kv_pages: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    query_starts: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int,
    out: torch.Tensor,
) -> None:
    """The sequences with more than LONG_PREFILL_TOKENS queries (the C call skipped them):
    each through SDPA over a gather of its own K/V, causal with its cached prefix (and
    within `window` keys when window > 0)."""
    starts, lens = query_starts.tolist(), context_lens.tolist()
    num_kv_heads, head_dim = kv_pages.shape[4:]
    for seq, (start, end) in enumerate(itertools.pairwise(starts)):
        if end - start <= LONG_PREFILL_TOKENS:
            continue
        context = lens[seq]
        pages = block_tables[seq, : -(-context // kv_pages.shape[3])].long()
        kv = kv_pages[pages, layer]  # [blocks, 2, block_size, kv_heads, head_dim], a copy
        key, value = (
            kv[:, which].reshape(-1, num_kv_heads, head_dim)[:context] for which in (0, 1)
        )
        # A whole prompt is plain causal attention (torch's flash kernel); an extend sees its
        # cached prefix too, and a window hides old keys, which only an explicit mask can say.
        visible = None
        if end - start < context or window > 0:
            positions = torch.arange(context)
            query_positions = positions[context - (end - start) :, None]  # [q, 1]
            visible = positions[None, :] <= query_positions  # [q, ctx]
            if window > 0:
                visible &= positions[None, :] > query_positions - window
        result = F.scaled_dot_product_attention(  # [1, heads, q_len, head_dim]
            query[None, start:end].transpose(1, 2),  # 4-D: 3-D inputs take the slow math path
            key[None].transpose(1, 2),
            value[None].transpose(1, 2),
            attn_mask=visible,
            is_causal=visible is None,
            scale=scale,
            enable_gqa=query.shape[1] != num_kv_heads,
        )
        out[start:end] = result[0].transpose(0, 1)


def _layer_pointer(kv_pages: torch.Tensor, layer: int) -> int:
    """Address of kv_pages[0, layer, 0, 0, 0, 0]."""
    return kv_pages.data_ptr() + FLOAT_BYTES * layer * kv_pages.stride(1)


def _kv_strides(kv_pages: torch.Tensor) -> tuple[int, int, int, int]:
    """Element strides along page, K/V, position and head."""
    strides = kv_pages.stride()
    return strides[0], strides[2], strides[3], strides[4]
