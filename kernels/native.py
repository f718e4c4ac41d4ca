"""The native CPU kernels: C (OpenMP) LoRA shrink/expand, KV write and paged attention.

Also the copies of an adapter read into its pages (`pack_copies`, native_pack.c): the
loader's work, not a step's, done in C where the engine runs these kernels.

The glue between projections (add + RMSNorm, the gated activation, RoPE before the C KV
write) is the references' torch code: on a CPU a launch costs no device time, and those
ops are a small part of a step.

Semantics, arguments and results are those of the ops of kernels/ops.py; these
wrappers check shapes, dtypes and devices (ValueError) and hand pointers and strides
to the C code (`native_lora.c`, `native_attention.c`), which reads adapter weights
and K/V in place in the pool through the offset tables and block tables: no gather,
no copy, no loop over segments or sequences in Python. float32 on the CPU only.
The library is compiled on first use (kernels/native_build.py).

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
import functools
import itertools

import torch
import torch.nn.functional as F

from loraserve.kernels import native_build, reference
from loraserve.kernels import native_checks as checks
from loraserve.kernels.checks import (
    check_attention,
    check_expand,
    check_sequences,
    check_shrink,
    check_write_kv,
)
from loraserve.kernels.ops import LoraWeights, Scores, Segments, Sequences

__all__ = [
    "add_rms_norm_shrink",
    "available",
    "gated_activation_shrink",
    "lora_expand",
    "lora_shrink",
    "pack_copies",
    "paged_attention",
    "rope_write_kv",
    "rope_write_kv_attention",
    "write_kv",
]

# Queries of one sequence above which torch's SDPA (its flash kernel) beats the C loop, the
# gather of that sequence's K/V included: measured crossovers 512-1024 at head_dim 64 and 128
# on 2 threads, 256-512 on one (bench/cpu_kernels.py, bench/results/README.md).
LONG_PREFILL_TOKENS = 512

# The C functions' parameters, one letter each (see their comments in the .c files):
# p pointer, i int64_t, f float, n int (the number of OpenMP threads).
_SIGNATURES = {
    "loraserve_lora_shrink": "piiipipiipiiiippiipn",
    "loraserve_lora_expand": "piipipipiipiiiipppipiipn",
    "loraserve_write_kv": "piiiiiiiipiipiipiin",
    "loraserve_paged_attention": "piipiiiiiiiiipiiippiififipiin",
    "loraserve_pack_copies": "pipippi",
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
    weights: LoraWeights,
    segments: Segments,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """ops.LoraShrink. x and the pool float32 (x with any row stride, the pool contiguous),
    everything on the CPU, segments int32 (others are converted); `out`: an optional
    [num_tokens, num_slices, max_rank] float32 contiguous buffer for y."""
    pool, offsets, ranks = weights.pool, weights.a_offsets, weights.ranks
    max_rank = segments.max_rank
    checks.check_cpu_float32(x=x, pool=pool)
    check_shrink(x, weights)
    starts, slots = checks.segments(segments)
    num_tokens, in_dim = x.shape
    num_slots, num_slices = offsets.shape
    shape = (num_tokens, num_slices, max_rank)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    elif out.shape != shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor {shape}, got {out.shape}")
    status = _native().loraserve_lora_shrink(
        x.data_ptr(), x.stride(0), num_tokens, in_dim, pool.data_ptr(), pool.numel(),
        offsets.data_ptr(), *offsets.stride(), ranks.data_ptr(), *ranks.stride(),
        num_slots, num_slices, starts.data_ptr(), slots.data_ptr(), slots.shape[0],
        max_rank, out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status:
        checks.raise_lora_error(status, starts, slots, offsets, ranks, max_rank, pool)
    return out


def lora_expand(
    out: torch.Tensor, y: torch.Tensor, weights: LoraWeights, segments: Segments
) -> None:
    """ops.LoraExpand. out (any row stride), y and the pool float32, everything on the CPU
    (the slices made for it), segments int32 (others are converted)."""
    pool, offsets, ranks = weights.pool, weights.b_offsets, weights.ranks
    checks.check_cpu_float32(out=out, y=y, pool=pool)
    check_expand(out, y, weights)
    g_offsets, bias = weights.g_offsets, weights.bias
    if bias is not None:
        checks.check_cpu_float32(bias=bias)
    num_slots, num_slices = offsets.shape
    starts, slots = checks.segments(segments)
    status = _native().loraserve_lora_expand(
        out.data_ptr(), out.stride(0), out.shape[0], y.data_ptr(), y.shape[2], pool.data_ptr(),
        pool.numel(), offsets.data_ptr(), *offsets.stride(), ranks.data_ptr(),
        *ranks.stride(), num_slots, num_slices, weights.slices.tensor.data_ptr(),
        starts.data_ptr(), slots.data_ptr(), slots.shape[0],
        None if g_offsets is None else g_offsets.data_ptr(),
        *((0, 0) if g_offsets is None else g_offsets.stride()),
        None if bias is None or g_offsets is None else bias.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    if status:
        checks.raise_lora_error(status, starts, slots, offsets, ranks, y.shape[2], pool)


def pack_copies(
    source: torch.Tensor, target: torch.Tensor, table: torch.Tensor, scales: torch.Tensor
) -> None:
    """Semantics (native_pack.c): for every copy i, (s, rs, cs, t, rows, cols) = table[i],
    target[t + r * cols + c] = scales[i] * source[s + r * rs + c * cs] for r < rows, c < cols.

    source: [source elements] float32, contiguous (a read file's data)
    target: [target elements] float32, contiguous (an adapter's pages)
    table: [num_copies, 6] int64, contiguous; scales: [num_copies] float32, contiguous
    ValueError, with nothing written, when a copy reaches outside source or target."""
    checks.check_cpu_float32(source=source, target=target, scales=scales)
    if table.dtype != torch.int64 or table.dim() != 2 or table.shape[1] != 6:
        raise ValueError(f"table must be [num_copies, 6] int64, got {table.dtype} {table.shape}")
    if scales.shape != table.shape[:1]:
        raise ValueError(f"scales must be [{table.shape[0]}], got {list(scales.shape)}")
    for name, tensor in (("source", source), ("target", target), ("table", table)):
        if not tensor.is_contiguous() or not tensor.is_cpu:
            raise ValueError(f"{name} must be a contiguous CPU tensor")
    scales = scales.contiguous()
    status = _native().loraserve_pack_copies(
        source.data_ptr(), source.numel(), target.data_ptr(), target.numel(),
        table.data_ptr(), scales.data_ptr(), table.shape[0],
    )  # fmt: skip
    if status:
        raise ValueError(
            f"a copy of the table reaches outside the source ({source.numel()} elements) "
            f"or the target ({target.numel()})"
        )


def write_kv(
    kv: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """ops.WriteKV. kv (any strides but a unit one along head_dim), key and value float32,
    everything on the CPU."""
    checks.check_cpu_float32(kv=kv, key=key, value=value)
    check_write_kv(kv, key, value, slot_mapping)
    status = _native().loraserve_write_kv(
        kv.data_ptr(), *kv.stride()[:4], kv.shape[0], kv.shape[2], *kv.shape[3:],
        key.data_ptr(), key.stride(0), key.stride(1), value.data_ptr(), value.stride(0),
        value.stride(1), slot_mapping.data_ptr(), slot_mapping.stride(0), key.shape[0],
        torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise ValueError(
            f"slot_mapping must be < num_pages * block_size = "
            f"{kv.shape[0] * kv.shape[2]}, got max {int(slot_mapping.max())}"
        )


rope_write_kv = functools.partial(reference.rope_write_kv, write=write_kv)
"""ops.RopeWriteKV: the rotation in torch (reference.rope), the write in C (write_kv)."""

add_rms_norm_shrink = functools.partial(reference.add_rms_norm_shrink, shrink=lora_shrink)
"""ops.AddRMSNormShrink: the norm in torch (reference.add_rms_norm), the shrink in C."""

gated_activation_shrink = functools.partial(reference.gated_activation_shrink, shrink=lora_shrink)
"""ops.GatedActivationShrink: the activation in torch (reference.gated_activation), the
shrink in C."""


def paged_attention(
    query: torch.Tensor,
    kv: torch.Tensor,
    seqs: Sequences,
    scores: Scores,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """ops.PagedAttention. query (a view of the fused qkv buffer is fine) and kv float32
    with a unit stride along head_dim, on the CPU; block_tables int32 with any strides,
    query_starts and context_lens int32 (others are converted). `out`: an optional
    [num_tokens, num_heads, head_dim] float32 buffer, unit stride on head_dim; returns it,
    or a new contiguous tensor."""
    checks.check_cpu_float32(query=query, kv=kv)
    num_tokens, num_heads, head_dim = check_attention(query, kv)
    if out is None:
        out = torch.empty(query.shape, dtype=torch.float32)
    elif out.shape != query.shape or out.dtype != torch.float32 or out.stride(2) != 1:
        raise ValueError(f"out must be float32 {tuple(query.shape)}, got {out.shape} {out.dtype}")
    tables = checks.int32(seqs.block_tables, "block_tables", contiguous=False)
    starts = checks.int32(seqs.query_starts, "query_starts")
    lens = checks.int32(seqs.context_lens, "context_lens")
    check_sequences(tables, starts, lens)
    # SDPA cannot soft-cap: with a cap, long prefills stay in C too.
    max_query_len = LONG_PREFILL_TOKENS if scores.softcap == 0 else num_tokens
    status = _native().loraserve_paged_attention(
        query.data_ptr(), query.stride(0), query.stride(1), kv.data_ptr(), *kv.stride()[:4],
        kv.shape[0], kv.shape[2], num_heads, kv.shape[3], head_dim, tables.data_ptr(),
        *tables.stride(), tables.shape[1], starts.data_ptr(), lens.data_ptr(), lens.shape[0],
        num_tokens, scores.scale, scores.window, scores.softcap, max_query_len, out.data_ptr(),
        out.stride(0), out.stride(1), torch.get_num_threads(),
    )  # fmt: skip
    if status:
        checks.raise_attention_error(status, starts, lens, tables, kv)
    if num_tokens > max_query_len:
        _long_prefills(query, kv, tables, starts.tolist(), lens.tolist(), scores, out)
    return out


rope_write_kv_attention = functools.partial(
    reference.rope_write_kv_attention, rope_write=rope_write_kv, attention=paged_attention
)
"""ops.RopeWriteKVAttention: this module's rope_write_kv, then its paged_attention."""


def _long_prefills(
    query: torch.Tensor,
    kv: torch.Tensor,
    block_tables: torch.Tensor,
    starts: list[int],
    lens: list[int],
    scores: Scores,
    out: torch.Tensor,
) -> None:
    """The sequences with more than LONG_PREFILL_TOKENS queries (the C call skipped them):
    each through SDPA over a gather of its own K/V, causal with its cached prefix (and
    within the window when there is one)."""
    num_kv_heads, head_dim, window = kv.shape[3], kv.shape[4], scores.window
    for seq, (start, end) in enumerate(itertools.pairwise(starts)):
        if end - start <= LONG_PREFILL_TOKENS:
            continue
        context = lens[seq]
        pages = block_tables[seq, : -(-context // kv.shape[2])].long()
        gathered = kv[pages]  # [blocks, 2, block_size, kv_heads, head_dim], a copy
        key, value = (
            gathered[:, which].reshape(-1, num_kv_heads, head_dim)[:context] for which in (0, 1)
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
            scale=scores.scale,
            enable_gqa=query.shape[1] != num_kv_heads,
        )
        out[start:end] = result[0].transpose(0, 1)
