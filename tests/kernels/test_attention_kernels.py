"""The Triton paged attention and KV write kernels, and the CPU path's attention,
against the torch references.

The KV cache is the 6-D view of a real pool (`pool[:, :kv_numel].view(...)`, so
its page stride is the pool's page size), NaN wherever nothing was written
(other layers, other pages, the tail of each sequence's last page); sequences
own shuffled pages; context lengths are not multiples of the block size.
Sliding windows (Mistral, Gemma's local layers) and soft-capped scores (Gemma 2)
are checked on every implementation: windows of 1, shorter than a page, across
page boundaries and longer than every context.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch

from loraserve.kernels import native, reference, torch_path
from loraserve.kernels.kv_write import write_kv
from loraserve.kernels.ops import Scores, SequenceBatch
from loraserve.kernels.paged_attention import paged_attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.gpu),  # the interpreter's bf16 is wrong
]
TOLERANCES = {  # float32 softmax; half precision rounds the probabilities before P @ V
    torch.float32: (1e-4, 1e-4),  # (rtol, atol)
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
NUM_LAYERS, LAYER = 3, 2
# (query tokens, context length) of each sequence.
BATCHES = {
    "decode": [(1, 1), (1, 17), (1, 100), (1, 33), (1, 64)],
    "prefill": [(17, 17), (1, 1), (40, 40)],
    "extend": [(4, 20), (17, 50), (1, 33), (2, 2)],  # cached prefix + new tokens, and a decode
}
HEADS = [(4, 4), (8, 2), (16, 2)]  # (query heads, KV heads): GQA ratios 1, 4, 8
# (window, softcap) of a layer: 0 = none. Windows: one key, less than a page (16), across
# page boundaries, beyond every context (as none); caps: Gemma 2's 50 and a tight one.
WINDOWED = [(1, 0.0), (5, 0.0), (23, 0.0), (500, 0.0), (0, 50.0), (7, 2.0)]
LAYOUTS = [(64, 16), (128, 32)]  # (head_dim, block_size)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@dataclass
class PagedCache:
    """A NaN pool, its KV view and the page tables of a batch of sequences."""

    pool: torch.Tensor  # [num_pages, page_numel]
    kv_pages: (
        torch.Tensor
    )  # [num_pages, NUM_LAYERS, 2, block_size, kv_heads, head_dim] view of pool
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor  # [num_seqs] int32


@pytest.fixture
def generator(request: pytest.FixtureRequest) -> torch.Generator:
    """Fresh random numbers per test, the same on every run of that test."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


def make_cache(
    context_lens: list[int],
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    generator: torch.Generator,
) -> PagedCache:
    """Pages for every sequence, shuffled, out of a pool with more pages than needed."""
    blocks = [-(-length // block_size) for length in context_lens]
    num_pages = sum(blocks) + 5
    kv_numel = NUM_LAYERS * 2 * block_size * kv_heads * head_dim
    pool = torch.full((num_pages, kv_numel + 40), float("nan"), dtype=dtype, device=DEVICE)
    kv_pages = pool[:, :kv_numel].view(num_pages, NUM_LAYERS, 2, block_size, kv_heads, head_dim)
    pages = torch.randperm(num_pages, generator=generator)
    # Padded with a page that holds NaN: entries past a sequence's blocks must not be read.
    block_tables = torch.full(
        (len(context_lens), max(blocks) + 1), int(pages[-1]), dtype=torch.int32
    )
    used = 0
    for seq, count in enumerate(blocks):
        block_tables[seq, :count] = pages[used : used + count]
        used += count
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return PagedCache(pool, kv_pages, block_tables.to(DEVICE), lens.to(DEVICE))


def slot_mapping(cache: PagedCache, first: list[int], last: list[int]) -> torch.Tensor:
    """Pool slots of positions first[s]..last[s]-1 of every sequence s, in order."""
    block_size = cache.kv_pages.shape[3]
    tables = cache.block_tables.cpu()
    slots = [
        int(tables[seq, position // block_size]) * block_size + position % block_size
        for seq in range(len(first))
        for position in range(first[seq], last[seq])
    ]
    return torch.tensor(slots, dtype=torch.int64, device=DEVICE)


def fill_cache(cache: PagedCache, generator: torch.Generator) -> None:
    """Write random K/V for every position of every sequence (with the reference writer)."""
    lens = cache.context_lens.tolist()
    slots = slot_mapping(cache, [0] * len(lens), lens)
    kv_heads, head_dim = cache.kv_pages.shape[4:]
    for layer in (LAYER, 0):  # another layer too: reading the wrong one must show
        key, value = torch.randn(2, len(slots), kv_heads, head_dim, generator=generator).to(
            DEVICE, cache.pool.dtype
        )
        reference.write_kv(cache.kv_pages[:, layer], key, value, slots)


def attention_inputs(
    batch: list[tuple[int, int]],
    heads: tuple[int, int],
    layout: tuple[int, int],
    dtype: torch.dtype,
    generator: torch.Generator,
) -> tuple:
    """(query, the KV view of layer LAYER, the sequences) on a fresh cache."""
    (num_heads, kv_heads), (head_dim, block_size) = heads, layout
    query_lens, context_lens = zip(*batch, strict=True)
    cache = make_cache(list(context_lens), kv_heads, head_dim, block_size, dtype, generator)
    fill_cache(cache, generator)
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=generator).to(DEVICE, dtype)
    query_starts = torch.tensor(
        [0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32
    )
    seqs = SequenceBatch(
        query_starts=query_starts.to(DEVICE),
        context_lens=cache.context_lens,
        block_tables=cache.block_tables,
    )
    return query, cache.kv_pages[:, LAYER], seqs


def run_attention(
    batch: list[tuple[int, int]],
    heads: tuple[int, int],
    layout: tuple[int, int],
    dtype: torch.dtype,
    generator: torch.Generator,
    num_splits: int | None = None,
    window: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel output, reference output) on a fresh cache."""
    query, kv, seqs = attention_inputs(batch, heads, layout, dtype, generator)
    scores = Scores(layout[0] ** -0.5, window, softcap)
    out = torch.full_like(query, float("nan"))
    paged_attention(query, kv, seqs, scores, out=out, num_splits=num_splits)
    return out, reference.paged_attention(query, kv, seqs, scores)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: f"d{layout[0]}-bs{layout[1]}")
@pytest.mark.parametrize("heads", HEADS, ids=lambda heads: f"h{heads[0]}-kv{heads[1]}")
@pytest.mark.parametrize("kind", list(BATCHES))
def test_paged_attention_matches_reference(kind: str, heads, layout, dtype: torch.dtype, generator):
    out, expected = run_attention(BATCHES[kind], heads, layout, dtype, generator)
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("num_splits", [2, 5])
@pytest.mark.parametrize("kind", ["decode", "extend"])
def test_paged_attention_split_kv_matches_reference(kind: str, num_splits: int, generator):
    out, expected = run_attention(
        BATCHES[kind], (8, 2), (64, 16), torch.float16, generator, num_splits
    )
    assert_close(out, expected, torch.float16)


@pytest.mark.parametrize("scores", WINDOWED, ids=lambda s: f"w{s[0]}-cap{s[1]:g}")
@pytest.mark.parametrize("kind", list(BATCHES))
def test_paged_attention_window_and_softcap_match_reference(kind: str, scores, generator):
    window, softcap = scores
    out, expected = run_attention(
        BATCHES[kind], (8, 2), (64, 16), torch.float32, generator, None, window, softcap
    )
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("scores", [(23, 0.0), (40, 5.0)], ids=["w23", "w40-cap5"])
def test_paged_attention_split_kv_with_window(scores, generator):
    """Partitions wholly before a query's window hold no key of its: weight 0 when combined."""
    window, softcap = scores
    out, expected = run_attention(
        BATCHES["decode"], (8, 2), (64, 16), torch.float32, generator, 4, window, softcap
    )
    assert_close(out, expected, torch.float32)


def test_reference_window_and_softcap_semantics(generator):
    """The yardstick itself, against attention written out for one decoding sequence."""
    query, kv, seqs = attention_inputs([(1, 20)], (2, 2), (64, 16), torch.float32, generator)
    keys = kv[seqs.block_tables[0, :2].long()].transpose(0, 1).reshape(2, 32, 2, 64)[:, :20]
    window, softcap, scale = 6, 3.0, 0.125
    scores = torch.einsum("hd,khd->hk", query[0], keys[0, -window:]) * scale
    weights = (softcap * torch.tanh(scores / softcap)).softmax(dim=-1)  # [heads, window]
    expected = torch.einsum("hk,khd->hd", weights, keys[1, -window:])
    out = reference.paged_attention(query, kv, seqs, Scores(scale, window, softcap))
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)


def test_paged_attention_rejects_bad_inputs(generator):
    cache = make_cache([5], 2, 64, 16, torch.float32, generator)
    query = torch.randn(1, 6, 64, device=DEVICE)  # GQA group of 3
    starts = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
    seqs = SequenceBatch(starts, cache.context_lens, cache.block_tables)
    kv, scores = cache.kv_pages[:, 0], Scores(1.0)
    with pytest.raises(ValueError, match="one layer's"):
        paged_attention(query, cache.kv_pages, seqs, scores)  # every layer's
    with pytest.raises(ValueError, match="kv"):
        paged_attention(query.half(), kv, seqs, scores)
    with pytest.raises(ValueError, match="query_starts"):
        bad = SequenceBatch(starts[:1], cache.context_lens, cache.block_tables)
        paged_attention(query, kv, bad, scores)


@pytest.mark.parametrize("bad", [dict(window=-1), dict(softcap=-1.0), dict(softcap=float("nan"))])
def test_scores_reject_bad_window_or_softcap(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        Scores(1.0, **bad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: f"d{layout[0]}-bs{layout[1]}")
def test_write_kv_matches_reference(layout, dtype: torch.dtype, generator):
    head_dim, block_size = layout
    kv_heads = 3
    cache = make_cache([5, 40, 1], kv_heads, head_dim, block_size, dtype, generator)
    slots = slot_mapping(cache, [0, 31, 0], [5, 40, 1])  # a prefill, an extend, a decode
    # value is a column slice of a fused projection, as the engine passes it.
    fused = torch.randn(len(slots), 3 * kv_heads * head_dim, generator=generator).to(DEVICE, dtype)
    key = torch.randn(len(slots), kv_heads, head_dim, generator=generator).to(DEVICE, dtype)
    value = fused[:, kv_heads * head_dim : 2 * kv_heads * head_dim].view(-1, kv_heads, head_dim)
    expected = cache.pool.clone()
    expected_pages = expected[:, : cache.kv_pages[0].numel()].view(cache.kv_pages.shape)
    reference.write_kv(expected_pages[:, LAYER], key, value, slots)
    write_kv(cache.kv_pages[:, LAYER], key, value, slots)
    torch.testing.assert_close(cache.pool, expected, rtol=0, atol=0, equal_nan=True)


# 70 decodes beside a prefill: the CPU path splits the decodes into groups by context.
MANY_DECODES = [(1, 1 + (37 * seq) % 150) for seq in range(70)] + [(9, 30)]


# The CPU paths: kernels/torch_path.py (torch, any dtype) and kernels/native.py (C, float32 only).
CPU_PATHS = [
    pytest.param((torch_path, dtype), id=f"torch-{str(dtype)[6:]}")
    for dtype in (torch.float32, torch.float16)
] + [pytest.param((native, torch.float32), id="native-float32")]


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("heads", HEADS, ids=lambda heads: f"h{heads[0]}-kv{heads[1]}")
@pytest.mark.parametrize("kind", [*BATCHES, "many_decodes"])
def test_cpu_path_attention_matches_reference(kind: str, heads, path, generator):
    """kernels/torch_path.py: decodes batched, the rest as the reference; kernels/native.py: all in C.
    NaN pages past each context."""
    implementation, dtype = path
    batch = MANY_DECODES if kind == "many_decodes" else BATCHES[kind]
    args = attention_inputs(batch, heads, LAYOUTS[0], dtype, generator)
    head_dim = LAYOUTS[0][0]
    scores = Scores(head_dim**-0.5)
    out = implementation.paged_attention(*args, scores)
    assert_close(out, reference.paged_attention(*args, scores), dtype)


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("scores", WINDOWED, ids=lambda s: f"w{s[0]}-cap{s[1]:g}")
@pytest.mark.parametrize("kind", [*BATCHES, "many_decodes"])
def test_cpu_path_window_and_softcap_match_reference(kind: str, scores, path, generator):
    implementation, dtype = path
    batch = MANY_DECODES if kind == "many_decodes" else BATCHES[kind]
    window, softcap = scores
    args = attention_inputs(batch, (8, 2), LAYOUTS[0], dtype, generator)
    out = implementation.paged_attention(*args, Scores(0.125, window, softcap))
    assert_close(out, reference.paged_attention(*args, Scores(0.125, window, softcap)), dtype)


def test_split_kv_over_a_graph_wide_table_spreads_the_real_context(generator):
    """As in a CUDA graph: the block table has the bucket's full width (far more columns
    than any sequence uses) and the grid as many partitions as that width allows; the
    partition length comes from the device scalar max_context_len, so the real keys are
    spread over the partitions they need and the rest find none. Same result as the
    reference, and as the table cut to its used width."""
    query, kv, seqs = attention_inputs(
        BATCHES["decode"], (8, 2), (64, 16), torch.float32, generator
    )
    used = seqs.block_tables.shape[1]
    wide = torch.zeros(seqs.block_tables.shape[0], 4 * used + 3, dtype=torch.int32)
    wide[:, :used] = seqs.block_tables.cpu()
    max_context = seqs.context_lens.max().reshape(1)
    graph_like = SequenceBatch(seqs.query_starts, seqs.context_lens, wide.to(DEVICE), max_context)
    scores = Scores(64**-0.5)
    expected = reference.paged_attention(query, kv, seqs, scores)
    for num_splits in (1, 3, 4 * used):
        out = torch.full_like(query, float("nan"))
        paged_attention(query, kv, graph_like, scores, out=out, num_splits=num_splits)
        assert_close(out, expected, torch.float32)


def test_the_reference_kv_write_skips_padding_slots() -> None:
    """A slot < 0 (graph padding) writes nowhere: not, by wrapping around, in the last page."""
    kv = torch.zeros(3, 2, 4, 1, 2)  # [pages, K/V, block_size, kv_heads, head_dim]
    key, value = torch.ones(2, 1, 2), torch.full((2, 1, 2), 2.0)
    reference.write_kv(kv, key, value, torch.tensor([5, -1]))
    assert kv[1, 0, 1].tolist() == [[1.0, 1.0]] and kv[1, 1, 1].tolist() == [[2.0, 2.0]]
    assert int((kv != 0).sum()) == 4, "only slot 5 (page 1, position 1) was written"
