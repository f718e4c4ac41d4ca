"""The native C kernels (kernels/native.py) against the torch references, beyond the
`test_cpu_path_*` cases they share with kernels/torch_path.py.

Same builders as the LoRA and attention kernel tests (NaN pools, shuffled pages,
strided per-layer views of the offset and rank tables), here with odd sizes (in_dim
37 and 688, slices 67/129/255 wide, head_dim 40/72/128, blocks of 8..64), inputs and
outputs that are strided views of wider buffers as the model passes them, outputs
poisoned with NaN, decode + short extend + long prefill (the SDPA part) in one call,
bad metadata rejected before anything is written, and the OpenMP runtime shared with
torch.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from pathlib import Path

import pytest
import torch
from test_attention_kernels import LAYER, attention_inputs, make_cache, slot_mapping
from test_lora_kernels import (
    POPULARITIES,
    Group,
    LoraBatch,
    assert_close,
    make_batch,
    token_slots,
)

from loraserve.kernels import native, reference
from loraserve.kernels.constants import NO_ADAPTER
from loraserve.kernels.ops import LoraWeights, Scores, SequenceBatch

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler")

F32 = torch.float32
ODD_GROUPS = [
    Group("in37-w67", 0, 37, (67,)),
    Group("qkv-cpu-s2", 0, 256, (256, 256, 256)),
    Group("odd-slices", 1, 200, (129, 33, 255)),
    Group("gate_up-cpu-s2", 4, 256, (688, 688)),
    Group("down-cpu-s2", 6, 688, (256,)),
]
# Token counts of the segments: decodes, a 40-token chunk, a 17-token one (odd tails of the
# 16-token work items); segments 3 and 7 use no adapter (test_lora_kernels).
MIXED = (1, 40, 1, 5, 17, 1, 2, 3, 1)


@pytest.fixture
def generator(request: pytest.FixtureRequest) -> torch.Generator:
    """Fresh random numbers per test, the same on every run of that test."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


def wide_view(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    """A [rows, columns] view into a wider random buffer: row stride columns + 11."""
    return torch.randn(rows, columns + 11, generator=generator)[:, 5 : 5 + columns]


def shrink_inputs(
    group: Group, batch: LoraBatch, generator: torch.Generator
) -> tuple[torch.Tensor, LoraWeights]:
    """(x, a row-strided view as the model passes it; the weights of `group`)."""
    num_tokens = int(batch.segment_starts[-1])
    return wide_view(num_tokens, group.in_dim, generator), batch.weights(group)


@pytest.mark.parametrize("lengths", [MIXED, (70, 1, 45)], ids=["mixed", "prefill"])
@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("group", ODD_GROUPS, ids=lambda group: group.name)
def test_lora_matches_reference_on_odd_sizes_and_views(group, popularity, lengths, generator):
    batch = make_batch(group, lengths, popularity, F32, generator)
    x, weights = shrink_inputs(group, batch, generator)
    num_tokens, num_slices = x.shape[0], len(group.widths)
    y = torch.full((num_tokens, num_slices, batch.max_rank), float("nan"))
    assert native.lora_shrink(x, weights, batch, out=y) is y
    expected_y = reference.lora_shrink(x, weights, batch)
    assert_close(y, expected_y, F32)  # zeros past each rank and for NO_ADAPTER: no NaN left
    out = wide_view(num_tokens, sum(group.widths), generator)  # the model's row-strided output
    before, expected = out.clone(), out.clone()
    native.lora_expand(out, y, weights, batch)
    reference.lora_expand(expected, expected_y, weights, batch)
    assert_close(out, expected, F32)
    base_tokens = token_slots(batch) == NO_ADAPTER
    assert torch.equal(out[base_tokens], before[base_tokens])


def test_lora_takes_int64_segments(generator):
    group = ODD_GROUPS[2]
    batch = make_batch(group, MIXED, "zipf", F32, generator)
    x, weights = shrink_inputs(group, batch, generator)
    int64 = dataclasses.replace(
        batch, segment_starts=batch.segment_starts.long(), segment_slots=batch.segment_slots.long()
    )
    y = native.lora_shrink(x, weights, int64)
    assert_close(y, reference.lora_shrink(x, weights, batch), F32)
    out, expected = torch.zeros(2, x.shape[0], sum(group.widths))
    native.lora_expand(out, y, weights, int64)
    reference.lora_expand(expected, y, weights, batch)
    assert_close(out, expected, F32)


def bad_metadata(batch: LoraBatch, group: Group) -> dict[str, tuple[str, dict, dict]]:
    """Metadata that would make the kernel read out of bounds -> (the error it must raise,
    changes to the weights, changes to the segments)."""
    weights = batch.weights(group)
    beyond_pool = weights.a_offsets.clone()
    beyond_pool[:, 0] = batch.pool.numel() - 1
    too_high = weights.ranks.clone()
    too_high[:, 0] = batch.max_rank + 1
    slots, starts = batch.segment_slots.clone(), batch.segment_starts.clone()
    slots[0], starts[-1] = 99, starts[-1] - 1
    return {
        "slot": ("segment_slots", {}, {"segment_slots": slots}),
        "rank": ("max_rank", {"ranks": too_high}, {}),
        "offset": ("inside the pool", {"a_offsets": beyond_pool}, {}),
        "starts": ("segment_starts", {}, {"segment_starts": starts}),
        "dtype": ("float32", {}, {}),
    }


@pytest.mark.parametrize("case", ["slot", "rank", "offset", "starts", "dtype"])
def test_lora_rejects_bad_metadata_and_writes_nothing(case: str, generator):
    group = ODD_GROUPS[1]
    batch = make_batch(group, (2, 3, 1), "distinct", F32, generator)
    x, weights = shrink_inputs(group, batch, generator)
    match, weight_changes, segment_changes = bad_metadata(batch, group)[case]
    weights = dataclasses.replace(weights, **weight_changes)
    segments = dataclasses.replace(batch, **segment_changes)
    if case == "dtype":
        x = x.half()
    y = torch.full((6, 3, batch.max_rank), float("nan"))
    with pytest.raises(ValueError, match=match):
        native.lora_shrink(x, weights, segments, out=y)
    assert y.isnan().all()


HEAD_LAYOUTS = [  # (query heads, KV heads, head_dim, block_size)
    (4, 4, 64, 16),  # cpu-s2
    (8, 2, 128, 32),  # GQA 4
    (16, 2, 72, 8),  # GQA 8, head_dim not a multiple of 16
    (6, 3, 40, 64),
    (3, 1, 67, 16),  # odd head_dim and group
]
# (query tokens, context length) per sequence: decodes, short extends and prefills, and two
# past the C path's limit (run at 100 here), which go through SDPA, in one call.
MIXED_STEP = [(1, 1), (1, 90), (130, 130), (5, 77), (1, 33), (101, 200), (100, 100), (16, 40)]


@pytest.mark.parametrize("long_prefill", [100, 1 << 20], ids=["sdpa-past-100", "all-in-c"])
@pytest.mark.parametrize(
    "layout", HEAD_LAYOUTS, ids=lambda layout: "h{}-kv{}-d{}-bs{}".format(*layout)
)
def test_attention_mixed_step_strided_query_and_out(layout, long_prefill, generator, monkeypatch):
    monkeypatch.setattr(native, "LONG_PREFILL_TOKENS", long_prefill)
    num_heads, kv_heads, head_dim, block_size = layout
    query, kv, seqs = attention_inputs(
        MIXED_STEP, (num_heads, kv_heads), (head_dim, block_size), F32, generator
    )
    # As the model passes it: the query part of a fused [tokens, (heads + 2 kv) * dim] buffer.
    qkv = torch.randn(query.shape[0], (num_heads + 2 * kv_heads) * head_dim, generator=generator)
    qkv[:, : num_heads * head_dim] = query.flatten(1)
    query = qkv[:, : num_heads * head_dim].view(-1, num_heads, head_dim)
    out = torch.full((query.shape[0], num_heads, head_dim + 3), float("nan"))[..., :head_dim]
    scores = Scores(head_dim**-0.5)
    assert native.paged_attention(query, kv, seqs, scores, out=out) is out
    assert_close(out, reference.paged_attention(query.contiguous(), kv, seqs, scores), F32)


@pytest.mark.parametrize("long_prefill", [100, 1 << 20], ids=["sdpa-past-100", "all-in-c"])
@pytest.mark.parametrize("scores", [(37, 0.0), (9, 30.0)], ids=["w37", "w9-cap30"])
def test_attention_mixed_step_window_and_softcap(scores, long_prefill, generator, monkeypatch):
    """Windows in every path, the SDPA one for long prefills included (with a cap, those stay
    in C: SDPA cannot cap)."""
    monkeypatch.setattr(native, "LONG_PREFILL_TOKENS", long_prefill)
    window, softcap = scores
    args = attention_inputs(MIXED_STEP, (6, 3), (40, 8), F32, generator)
    out = torch.full_like(args[0], float("nan"))
    scores = Scores(0.2, window, softcap)
    assert native.paged_attention(*args, scores, out=out) is out
    assert_close(out, reference.paged_attention(*args, scores), F32)


@pytest.mark.parametrize("case", ["page", "context", "starts"])
def test_attention_rejects_bad_metadata(case: str, generator):
    query, kv, seqs = attention_inputs([(1, 20), (3, 3)], (4, 2), (64, 16), F32, generator)
    tables, starts, lens = (
        seqs.block_tables.clone(),
        seqs.query_starts.clone(),
        seqs.context_lens.clone(),
    )
    if case == "page":
        tables[0, 1] = kv.shape[0]
    elif case == "context":
        lens[1] = 2  # fewer than its 3 queries
    else:
        starts[-1] = 3
    out = torch.full_like(query, float("nan"))
    with pytest.raises(
        ValueError,
        match={"page": "block_tables", "context": "context_lens"}.get(case, "query_starts"),
    ):
        native.paged_attention(query, kv, SequenceBatch(starts, lens, tables), Scores(1.0), out=out)
    assert out.isnan().all()


def test_write_kv_strided_views_and_skipped_slots(generator):
    kv_heads, head_dim, block_size = 2, 72, 8
    cache = make_cache([5, 40, 1], kv_heads, head_dim, block_size, F32, generator)
    slots = slot_mapping(cache, [0, 31, 0], [5, 40, 1])
    slots[3] = -1  # a token not written (a padding slot)
    qkv = torch.randn(len(slots), 4 * kv_heads * head_dim, generator=generator)
    key = qkv[:, 2 * kv_heads * head_dim : 3 * kv_heads * head_dim].view(-1, kv_heads, head_dim)
    value = qkv[:, 3 * kv_heads * head_dim :].view(-1, kv_heads, head_dim)
    expected = cache.pool.clone()
    expected_pages = expected[:, : cache.kv_pages[0].numel()].view(cache.kv_pages.shape)
    kept = slots >= 0
    reference.write_kv(expected_pages[:, LAYER], key[kept], value[kept], slots[kept])
    native.write_kv(cache.kv_pages[:, LAYER], key, value, slots)
    torch.testing.assert_close(cache.pool, expected, rtol=0, atol=0, equal_nan=True)
    slots[0] = cache.kv_pages.shape[0] * block_size
    with pytest.raises(ValueError, match="slot_mapping"):
        native.write_kv(cache.kv_pages[:, LAYER], key, value, slots)


def test_one_openmp_runtime_shared_with_torch():
    """The library's OpenMP is torch's (one libgomp mapped): its threads are torch's pool."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    runtimes = set(re.findall(r"\S*lib[gi]omp[^/\s]*\.so[^/\s]*", maps.read_text()))
    assert len(runtimes) == 1, runtimes


def test_same_results_on_one_thread(generator):
    """Every output element is computed by one thread: the thread count changes nothing."""
    group = ODD_GROUPS[3]
    batch = make_batch(group, MIXED, "uniform", F32, generator)
    x, weights = shrink_inputs(group, batch, generator)
    attention_args = attention_inputs(MIXED_STEP[:5], (8, 2), (64, 16), F32, generator)
    threads = torch.get_num_threads()
    results = []
    for count in (threads, 1):
        torch.set_num_threads(count)
        try:
            results.append(
                (
                    native.lora_shrink(x, weights, batch),
                    native.paged_attention(*attention_args, Scores(0.125)),
                )
            )
        finally:
            torch.set_num_threads(threads)
    for many, one in zip(*results, strict=True):
        assert torch.equal(many, one)


@pytest.mark.parametrize("threads", [2, 1])
def test_lora_decode_of_many_segments_runs_every_item_once(threads, generator):
    """A decode step of many one-token segments (and a prefill chunk) is many small work
    items, which the threads claim one ahead of the one they run (prefetching its weights):
    every y row written once (no NaN of the poisoned buffer left) and every expand added
    once, on two threads as on one."""
    group = ODD_GROUPS[1]
    lengths = (1,) * 61 + (40,)
    batch = make_batch(group, lengths, "uniform", F32, generator)
    x, weights = shrink_inputs(group, batch, generator)
    y = torch.full((x.shape[0], len(group.widths), batch.max_rank), float("nan"))
    out = wide_view(x.shape[0], sum(group.widths), generator)
    expected = out.clone()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        native.lora_shrink(x, weights, batch, out=y)
        native.lora_expand(out, y, weights, batch)
    finally:
        torch.set_num_threads(before)
    expected_y = reference.lora_shrink(x, weights, batch)
    assert_close(y, expected_y, F32)
    reference.lora_expand(expected, expected_y, weights, batch)
    assert_close(out, expected, F32)


def test_attention_nan_query_stays_its_own(generator):
    """A NaN in one token's query makes that token's output NaN (as the reference), no other."""
    args = attention_inputs([(1, 20), (1, 7), (3, 9)], (4, 2), (64, 16), F32, generator)
    query = args[0].clone()
    query[1, 0, 5] = float("nan")
    out = native.paged_attention(query, *args[1:], Scores(0.125))
    expected = reference.paged_attention(query, *args[1:], Scores(0.125))
    assert out[1, 0].isnan().all() and expected[1, 0].isnan().all()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4, equal_nan=True)


def test_pack_copies_writes_straight_and_transposed_scaled_matrices(generator):
    """An adapter read's copies (memory/adapter_layout.py): A's as the file holds them, B's
    read transposed and scaled, at odd sizes and offsets, into a NaN-poisoned target; the
    elements no copy writes keep their poison."""
    source = torch.randn(5_000, generator=generator)
    target = torch.full((4_000,), float("nan"))
    # (source, row stride, column stride, target, rows, columns), scale
    copies = [
        ((3, 37, 1, 0, 7, 37), 1.0),  # an A [7, 37]
        ((300, 1, 7, 259, 7, 67), 0.37),  # a B [67, 7] in the file, [7, 67] in the pages
        ((1_000, 1, 16, 900, 16, 129), 2.0),  # rank 16, 129 wide
        ((4_000, 1, 1, 3_000, 1, 1), -1.5),  # rank 1, one column
    ]
    table = torch.tensor([copy for copy, _ in copies], dtype=torch.int64)
    scales = torch.tensor([scale for _, scale in copies], dtype=F32)
    native.pack_copies(source, target, table, scales)
    expected = torch.full_like(target, float("nan"))
    for (start, row_stride, column_stride, at, rows, columns), scale in copies:
        read = source.as_strided((rows, columns), (row_stride, column_stride), start)
        expected[at : at + rows * columns] = (read * scale).reshape(-1)
    assert torch.equal(target.nan_to_num(7.0), expected.nan_to_num(7.0))  # bits, poison kept


@pytest.mark.parametrize(
    "copy",
    [
        (4_985, 1, 4, 0, 4, 4),  # its last read one past the source
        (0, 4, 1, 3_985, 4, 4),  # its last write one past the target
        (-1, 4, 1, 0, 4, 4),  # before the source
        (0, 4, 1, 0, -4, 4),  # a negative size
    ],
)
def test_pack_copies_rejects_a_copy_out_of_bounds_and_writes_nothing(copy, generator):
    source = torch.randn(5_000, generator=generator)
    target = torch.full((4_000,), float("nan"))
    table = torch.tensor([(0, 4, 1, 0, 4, 4), copy], dtype=torch.int64)  # a good one first
    with pytest.raises(ValueError, match="reaches outside the source"):
        native.pack_copies(source, target, table, torch.ones(2))
    assert target.isnan().all()
