"""The fused decode op (kernels/rope_kv_attention.py: RoPE, the KV write and paged attention
in one launch) against the references, and against the two Triton launches it replaces.

Decode batches only (one new token per sequence, at position context_len - 1). The pool is
NaN wherever nothing was written, including every new token's own slot before the call:
a program that read the slot instead of its registers would see NaN. q/k/v are column
views of one fused qkv buffer, as the model passes them; the output starts as NaN. Padding
sequences are a CUDA graph's: context 1, a block table of page 0 (here the page a real
sequence writes its new token in), slot -1: nothing may be written for them, and their
rows are never read.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch
from test_attention_kernels import LAYER, PagedCache, make_cache, slot_mapping

from loraserve.kernels import native, reference, torch_path
from loraserve.kernels.ops import Scores, SequenceBatch
from loraserve.kernels.paged_attention import paged_attention
from loraserve.kernels.rope_kv_attention import rope_write_kv_attention
from loraserve.kernels.rope_kv_write import rope_write_kv

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.gpu),  # the interpreter's bf16 is wrong
]
TOLERANCES = {  # against the float32 reference: as tests/kernels/test_attention_kernels.py
    torch.float32: (1e-4, 1e-4),  # (rtol, atol)
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
# (heads, kv_heads, head_dim, rotary_dim, block_size): MHA, GQA 4, Phi-4-mini's partial
# rotary (0.75 of 128), MQA with an odd head_dim and an odd rotary half, GQA of 3 (odd).
SHAPES = [
    (4, 4, 64, 64, 16),
    (8, 2, 128, 128, 16),
    (6, 2, 128, 96, 32),
    (3, 1, 40, 22, 16),
    (12, 4, 64, 64, 16),
]
CONTEXTS = [1, 17, 100, 33, 64, 16]  # each sequence's tokens after the step, the new one last


@pytest.fixture
def generator(request: pytest.FixtureRequest) -> torch.Generator:
    """Fresh random numbers per test, the same on every run of that test."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


class DecodeStep:
    """A decode batch's inputs on a fresh cache: every position but the new one's written."""

    def __init__(
        self,
        shape: tuple[int, int, int, int, int],
        dtype: torch.dtype,
        generator: torch.Generator,
        num_padding: int = 0,
    ) -> None:
        num_heads, num_kv_heads, head_dim, rotary_dim, block_size = shape
        lens = CONTEXTS
        self.cache: PagedCache = make_cache(
            lens, num_kv_heads, head_dim, block_size, dtype, generator
        )
        old = slot_mapping(self.cache, [0] * len(lens), [length - 1 for length in lens])
        for layer in (LAYER, 0):  # another layer too: writing the wrong one must show
            key, value = torch.randn(2, len(old), num_kv_heads, head_dim, generator=generator)
            reference.write_kv(
                self.cache.kv_pages[:, layer], key.to(DEVICE, dtype), value.to(DEVICE, dtype), old
            )
        new = slot_mapping(self.cache, [length - 1 for length in lens], lens)
        tables, context_lens = self.cache.block_tables, self.cache.context_lens
        if num_padding:  # a CUDA graph's padding: context 1, one page (0 there), no slot
            # Here the page a real sequence writes its new token in: the worst case.
            page = torch.full_like(tables[:num_padding], int(new[2]) // block_size)
            tables = torch.cat([tables, page])
            context_lens = torch.cat([context_lens, torch.ones_like(context_lens[:num_padding])])
            new = torch.cat([new, torch.full_like(new[:num_padding], -1)])
        num_tokens = len(new)
        self.kept = new >= 0
        self.slots = new
        self.kv = self.cache.kv_pages[:, LAYER]
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.qkv = torch.randn(num_tokens, q_size + 2 * kv_size, generator=generator).to(
            DEVICE, dtype
        )
        q, k, v = self.qkv.split([q_size, kv_size, kv_size], dim=-1)
        self.query = q.view(num_tokens, num_heads, head_dim)  # views of qkv
        self.key = k.view(num_tokens, num_kv_heads, head_dim)
        self.value = v.view(num_tokens, num_kv_heads, head_dim)
        angles = torch.rand(num_tokens, rotary_dim // 2, generator=generator) * 100
        self.cos_sin = torch.stack((angles.cos(), angles.sin()), dim=1).to(DEVICE, dtype)
        starts = torch.arange(num_tokens + 1, dtype=torch.int32, device=DEVICE)
        self.seqs = SequenceBatch(starts, context_lens, tables)

    def args(self, kv: torch.Tensor) -> tuple:
        return (self.query, self.key, self.value, self.cos_sin, kv, self.slots)

    def expected(self, scores: Scores) -> tuple[torch.Tensor, torch.Tensor]:
        """(the reference's output, the pool it leaves) with the padding tokens' writes
        skipped, on a copy of the pool."""
        pool = self.cache.pool.clone()
        kv = pool[:, : self.cache.kv_pages[0].numel()].view(self.cache.kv_pages.shape)[:, LAYER]
        kept = self.kept
        cos, sin = reference.angles(self.cos_sin)
        key = reference.rope(self.key, cos, sin)
        reference.write_kv(kv, key[kept], self.value[kept], self.slots[kept])
        query = reference.rope(self.query, cos, sin)
        return reference.paged_attention(query, kv, self.seqs, scores), pool


def run_fused(
    step: DecodeStep, scores: Scores, num_splits: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fused output, the two launches' output, the two launches' pool), each op on its
    own copy of the pool (the fused one on the step's)."""
    before_qkv = step.qkv.clone()
    pool = step.cache.pool.clone()
    kv = pool[:, : step.cache.kv_pages[0].numel()].view(step.cache.kv_pages.shape)[:, LAYER]
    query = rope_write_kv(*step.args(kv))
    unfused = paged_attention(query, kv, step.seqs, scores, num_splits=num_splits)
    out = torch.full(step.query.shape, float("nan"), dtype=step.query.dtype, device=DEVICE)
    result = rope_write_kv_attention(
        *step.args(step.kv), step.seqs, scores, out=out, num_splits=num_splits
    )
    assert result is out
    assert torch.equal(step.qkv, before_qkv), "the inputs are read, never written"
    return out, unfused, pool


def check(step: DecodeStep, scores: Scores, num_splits: int | None = None) -> None:
    dtype = step.query.dtype
    out, unfused, unfused_pool = run_fused(step, scores, num_splits)
    expected, expected_pool = step.expected(scores)
    kept = step.kept
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(out[kept], expected[kept], rtol=rtol, atol=atol)
    # The pool: the new tokens' rotated k and v, nothing else (no padding slot, no other layer).
    exact = dtype != torch.float32  # rounded step by step as torch rounds
    pool_tolerance = dict(rtol=0, atol=0) if exact else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(step.cache.pool, expected_pool, equal_nan=True, **pool_tolerance)
    # The two launches it replaces: the same bits (compiled float32 may contract to FMAs).
    if INTERPRETED or exact:
        assert torch.equal(out[kept], unfused[kept])
        assert torch.equal(step.cache.pool.view(torch.uint8), unfused_pool.view(torch.uint8))
    else:
        torch.testing.assert_close(out[kept], unfused[kept], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "h{}-kv{}-d{}-r{}-bs{}".format(*s))
def test_fused_decode_matches_reference(shape, dtype: torch.dtype, generator) -> None:
    check(DecodeStep(shape, dtype, generator), Scores(shape[2] ** -0.5))


@pytest.mark.parametrize("num_splits", [2, 5])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3]], ids=["h8-kv2", "h3-kv1-partial"])
def test_fused_decode_split_kv_matches_reference(shape, num_splits: int, generator) -> None:
    """Partitions: the first one writes the new k/v, the one holding the new position reads
    it from registers, the combine merges them."""
    check(DecodeStep(shape, torch.float16, generator), Scores(0.125), num_splits)


# (window, softcap): one key (the new one alone), shorter than a page, across pages, past
# every context; Gemma 2's cap and a tight one with a window.
WINDOWED = [(1, 0.0), (5, 0.0), (23, 0.0), (500, 0.0), (0, 50.0), (7, 2.0)]


@pytest.mark.parametrize("scores", WINDOWED, ids=lambda s: f"w{s[0]}-cap{s[1]:g}")
def test_fused_decode_window_and_softcap_match_reference(scores, generator) -> None:
    window, softcap = scores
    check(DecodeStep(SHAPES[1], torch.float32, generator), Scores(0.125, window, softcap), 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_graph_padding_writes_nothing(num_splits: int, dtype: torch.dtype, generator) -> None:
    """Padding sequences (slot -1, context 1, a table of a page a real sequence writes in)
    write nothing; the real sequences get the reference's result."""
    step = DecodeStep(SHAPES[2], dtype, generator, num_padding=3)
    check(step, Scores(0.1, 0, 30.0), num_splits)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_the_new_key_comes_from_registers(num_splits: int, generator) -> None:
    """With every slot < 0 nothing is written, yet each token attends to its own k and v
    as if they were in the pool: the kernel never reads the new token's slot (still NaN),
    which a program of another KV head or partition could read before its write lands."""
    step = DecodeStep(SHAPES[4], torch.float16, generator)
    scores = Scores(0.125, 40)
    expected, _ = step.expected(scores)  # as if written
    step.slots = torch.full_like(step.slots, -1)
    before = step.cache.pool.clone()
    out = rope_write_kv_attention(*step.args(step.kv), step.seqs, scores, num_splits=num_splits)
    torch.testing.assert_close(out, expected, rtol=5e-3, atol=5e-3)
    assert torch.equal(step.cache.pool.view(torch.uint8), before.view(torch.uint8))


@pytest.mark.parametrize("path", [torch_path, native], ids=["torch", "native"])
def test_cpu_backends_compose_their_ops(path, generator) -> None:
    """The torch and native backends: their rope_write_kv, then their paged_attention."""
    if path is native and not native.available():
        pytest.skip("no C compiler for the native kernels")
    step = DecodeStep(SHAPES[3], torch.float32, generator)
    expected, expected_pool = step.expected(Scores(0.2, 9))
    out = path.rope_write_kv_attention(*step.args(step.kv), step.seqs, Scores(0.2, 9))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step.cache.pool, expected_pool, equal_nan=True)


def test_rejects_bad_arguments(generator) -> None:
    step = DecodeStep(SHAPES[1], torch.float16, generator)
    scores = Scores(0.125)
    with pytest.raises(ValueError, match="decode batches"):
        prefill = SequenceBatch(
            step.seqs.query_starts[:-1], step.seqs.context_lens[:-1], step.seqs.block_tables[:-1]
        )
        rope_write_kv_attention(*step.args(step.kv), prefill, scores)
    with pytest.raises(ValueError, match="share a float dtype"):
        rope_write_kv_attention(step.query.float(), *step.args(step.kv)[1:], step.seqs, scores)
    with pytest.raises(ValueError, match="one layer's"):
        rope_write_kv_attention(*step.args(step.cache.kv_pages), step.seqs, scores)
    with pytest.raises(ValueError, match="slot_mapping"):
        args = step.args(step.kv)
        rope_write_kv_attention(*args[:5], args[5].int(), step.seqs, scores)
