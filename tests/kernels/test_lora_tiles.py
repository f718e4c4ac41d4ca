"""The LoRA kernels' tile map (kernels/lora_tiles.py) and what it promises: the worked
example, every token in exactly one tile, the BGMV decode tiles against the reference,
the same bits run to run and whatever the padding, spare programs that touch nothing.

Batches and pools are test_lora_kernels.py's (NaN pools, shuffled pages, heterogeneous
ranks, untargeted slices, NO_ADAPTER segments). float32 and float16 only: the Triton
interpreter computes bfloat16 wrongly.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pytest
import torch
from test_lora_kernels import (
    DECODE_MIX,
    DEVICE,
    GROUPS,
    NUM_SLOTS,
    PREFILL,
    assert_close,
    make_batch,
    run_expand,
    run_shrink,
    token_slots,
)

from loraserve.kernels import lora_expand as expand_module
from loraserve.kernels import lora_shrink as shrink_module
from loraserve.kernels import reference
from loraserve.kernels.constants import NO_ADAPTER
from loraserve.kernels.lora_expand import lora_expand
from loraserve.kernels.lora_shrink import lora_shrink
from loraserve.kernels.lora_tiles import (
    DECODE_TILE_TOKENS,
    LoraTiles,
    choose_tile_tokens,
    fill_tile_map,
    tile_bound,
    tiles_of,
)
from loraserve.models.batch import LoraBatch

DECODE = (1,) * 8  # one token per sequence: the BGMV path
HALF_DTYPES = [torch.float32, torch.float16]


@pytest.fixture
def generator(request: pytest.FixtureRequest) -> torch.Generator:
    """Fresh random numbers per test, the same on every run of that test."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


def test_the_worked_example() -> None:
    starts = np.array([0, 3, 13, 18, 20], np.int32)
    slots = np.array([NO_ADAPTER, 0, 2, 1], np.int32)
    table = np.full((tile_bound(20, 4, 4), 3), 99, np.int32)
    assert fill_tile_map(starts, slots, 4, table) == 7
    assert table[:7].tolist() == [
        [NO_ADAPTER, 0, 3],
        [0, 3, 7],
        [0, 7, 11],
        [0, 11, 13],
        [2, 13, 17],
        [2, 17, 18],
        [1, 18, 20],
    ]
    assert (table[7:] == 99).all()  # rows past the tiles are left alone


@pytest.mark.parametrize("tile_tokens", [1, 16, 64])
def test_every_token_lies_in_one_tile_of_its_segment(tile_tokens: int) -> None:
    generator = np.random.default_rng(tile_tokens)
    for _ in range(50):
        lengths = generator.integers(0, 150, generator.integers(1, 12))  # empty segments too
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        slots = generator.integers(-1, 5, len(lengths)).astype(np.int32)
        num_tokens = int(starts[-1])
        table = np.zeros((max(1, tile_bound(num_tokens, len(slots), tile_tokens)), 3), np.int32)
        num_tiles = fill_tile_map(starts, slots, tile_tokens, table)
        covered = np.concatenate(
            [np.arange(first, end) for _, first, end in table[:num_tiles]] + [[]]
        )
        assert covered.tolist() == list(range(num_tokens))
        segment = np.searchsorted(starts, table[:num_tiles, 1], side="right") - 1
        assert (table[:num_tiles, 2] <= starts[segment + 1]).all()  # never past its segment
        assert (table[:num_tiles, 0] == slots[segment]).all()
        assert (table[:num_tiles, 2] - table[:num_tiles, 1] <= tile_tokens).all()


def test_tile_tokens_are_one_of_three() -> None:
    assert choose_tile_tokens(32, 32, decode=True) == DECODE_TILE_TOKENS
    assert choose_tile_tokens(32, 4, decode=True) == DECODE_TILE_TOKENS  # shared adapters
    assert choose_tile_tokens(37, 8, decode=False) == 16
    assert choose_tile_tokens(2048, 8, decode=False) == 64


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("popularity", ["distinct", "zipf"])
@pytest.mark.parametrize("group", GROUPS, ids=lambda group: group.name)
def test_decode_tiles_match_reference(group, popularity: str, dtype: torch.dtype, generator):
    batch = make_batch(group, DECODE, popularity, dtype, generator)
    y, expected_y = run_shrink(group, batch, dtype, generator)  # y was NaN: all written
    assert_close(y, expected_y, dtype)
    out, expected, before = run_expand(group, batch, dtype, generator)
    assert_close(out, expected, dtype)
    base_tokens = token_slots(batch) == NO_ADAPTER
    assert torch.equal(out[base_tokens], before[base_tokens])


def tiled(batch, padding: int, spare: int, tile_tokens: int) -> LoraBatch:
    """The batch's segments plus a NO_ADAPTER segment of `padding` tokens, with a tile map
    launched on `spare` more programs than it needs whose rows are poison (real tiles with
    another adapter): a spare program that did not return at once would show."""
    starts = batch.segment_starts.cpu()
    starts = torch.cat([starts, starts[-1:] + padding]) if padding else starts
    slots = batch.segment_slots.cpu()
    slots = torch.cat([slots, torch.tensor([NO_ADAPTER], dtype=torch.int32)]) if padding else slots
    bound = tile_bound(int(starts[-1]), len(slots), tile_tokens)
    table = np.zeros((bound + spare, 3), np.int32)
    num_tiles = fill_tile_map(starts.numpy(), slots.numpy(), tile_tokens, table)
    table[num_tiles : num_tiles + spare] = table[:spare]
    table[num_tiles : num_tiles + spare, 0] = 1
    tiles = LoraTiles(
        torch.from_numpy(table).to(DEVICE),
        torch.tensor([num_tiles], dtype=torch.int32, device=DEVICE),
        bound + spare,
        tile_tokens,
    )
    return LoraBatch(starts.to(DEVICE), slots.to(DEVICE), batch.max_rank, tiles)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("lengths", [DECODE, DECODE_MIX], ids=["decode", "decode_mix"])
def test_same_bits_run_to_run_and_whatever_the_padding(lengths, dtype: torch.dtype, generator):
    """A CUDA graph runs the batch padded to its bucket, on the bucket's grid; eagerly it runs
    unpadded on its own: every real token must come out with the same bits, and padding
    and spare programs must leave everything else as it was (sentinels)."""
    group, padding = GROUPS[0], 5
    batch = make_batch(group, lengths, "uniform", dtype, generator)
    num_tokens, num_slices = sum(lengths), len(group.widths)
    weights = batch.weights(group)
    tile_tokens = DECODE_TILE_TOKENS if lengths == DECODE else 16
    plain = tiled(batch, padding=0, spare=0, tile_tokens=tile_tokens)
    padded = tiled(batch, padding=padding, spare=3, tile_tokens=tile_tokens)
    x = torch.randn(num_tokens + padding, group.in_dim, generator=generator).to(DEVICE, dtype)
    before = torch.randn(num_tokens + padding, sum(group.widths), generator=generator)
    before = before.to(DEVICE, dtype)

    def run(segments: LoraBatch, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.full((rows, num_slices, batch.max_rank), float("nan"), device=DEVICE)
        lora_shrink(x[:rows], weights, segments, out=y)
        out = before[:rows].clone()
        lora_expand(out, y, weights, segments)
        return y, out

    y, out = run(plain, num_tokens)
    if DEVICE.type == "cuda":  # the interpreter's numpy is the same run to run by construction
        y_again, out_again = run(plain, num_tokens)
        assert torch.equal(y, y_again) and torch.equal(out, out_again)
    y_padded, out_padded = run(padded, num_tokens + padding)
    assert torch.equal(y_padded[:num_tokens], y) and torch.equal(out_padded[:num_tokens], out)
    assert torch.equal(y_padded[num_tokens:], torch.zeros_like(y_padded[num_tokens:]))
    assert torch.equal(out_padded[num_tokens:], before[num_tokens:])  # padding: untouched
    assert_close(y, reference.lora_shrink(x[:num_tokens], weights, plain), dtype)


@dataclasses.dataclass
class Launches:
    """A stand-in for a Triton kernel that records each launch's compile-time values."""

    seen: set = dataclasses.field(default_factory=set)

    def __getitem__(self, grid):
        def launch(*args, **constexprs):
            self.seen.add(tuple(sorted(constexprs.items())))

        return launch


def test_one_model_compiles_three_variants_per_kernel(monkeypatch, generator):
    """Block sizes are fixed per tile size, never searched, never derived from max_rank or
    the token count: any mix of batches of one model (one dtype) launches at most three
    variants of each kernel (1-, 16- and 64-token tiles)."""
    shrinks, expands = Launches(), Launches()
    monkeypatch.setattr(shrink_module, "_lora_shrink_kernel", shrinks)
    monkeypatch.setattr(expand_module, "_lora_expand_kernel", expands)
    for group in GROUPS:
        for lengths in (DECODE, DECODE[:3], DECODE_MIX, PREFILL, (300,), (1, 2, 3)):
            for popularity in ("distinct", "identical"):
                batch = make_batch(group, lengths, popularity, torch.float32, generator)
                run_shrink(group, batch, torch.float32, generator)
                run_expand(group, batch, torch.float32, generator)
    assert len(shrinks.seen) == 3 and len(expands.seen) == 3


def test_tiles_of_plain_segments_use_decode_tiles_only_for_one_token_segments() -> None:
    starts = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    slots = torch.tensor([0, NO_ADAPTER, 1], dtype=torch.int32)
    tiles = tiles_of(starts, slots)
    assert tiles.tile_tokens == DECODE_TILE_TOKENS and tiles.max_tiles == 3
    assert tiles.table.tolist() == [[0, 0, 1], [NO_ADAPTER, 1, 2], [1, 2, 3]]
    assert tiles_of(torch.tensor([0, 2, 3], dtype=torch.int32), slots[:2]).tile_tokens == 16
    assert NUM_SLOTS > 1  # the poison rows of `tiled` use slot 1
