"""DoRA in the LoRA expand kernels: g = m / ||W + sBA|| applied in the epilogue of DoRA
slices only, on every backend, against the reference and against a plain float64 formula.

The pools of test_lora_kernels.py (NaN everywhere but the matrices, shuffled pages) get
one more NaN page region holding a g vector per (slot, layer, slice) of the DoRA slots
(DORA_SLOTS), at odd offsets; the other slots stay plain LoRA in the same launch, beside
NO_ADAPTER runs. Plain slices must come out bit for bit as without any DoRA table.
"""

from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch
from test_lora_kernels import (
    DECODE_MIX,
    DEVICE,
    GROUPS,
    LAYER,
    NUM_LAYERS,
    NUM_MODULES,
    NUM_SLOTS,
    POPULARITIES,
    PREFILL,
    Group,
    LoraBatch,
    assert_close,
    make_batch,
    token_slots,
)

from loraserve.kernels import native, reference, torch_path
from loraserve.kernels.constants import NO_ADAPTER
from loraserve.kernels.lora_expand import lora_expand as triton_expand
from loraserve.kernels.ops import LoraWeights

DORA_SLOTS = (0, 2, 5, 7)  # with zipf (mostly 0, 1) and identical (2): DoRA in every batch
BACKENDS = [
    pytest.param((triton_expand, torch.float32), id="triton-float32"),
    pytest.param((triton_expand, torch.float16), id="triton-float16"),
    pytest.param((torch_path.lora_expand, torch.float32), id="torch-float32"),
    pytest.param((torch_path.lora_expand, torch.float16), id="torch-float16"),
    pytest.param((native.lora_expand, torch.float32), id="native-float32"),
]


@pytest.fixture
def generator(request: pytest.FixtureRequest) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


def add_dora(
    batch: LoraBatch, group: Group, dtype: torch.dtype, generator: torch.Generator
) -> tuple[LoraBatch, torch.Tensor]:
    """The batch with g vectors (near 1, as trained DoRA's are) for DORA_SLOTS, in new NaN pages
    after the pool's; and the g offset table [NUM_SLOTS, NUM_LAYERS, NUM_MODULES] (-1: plain)."""
    num_pages, page_numel = batch.pool.shape
    vectors = [
        (slot, layer, group.first_module + index, width)
        for slot in DORA_SLOTS
        for layer in range(NUM_LAYERS)
        for index, width in enumerate(group.widths)
    ]
    extra = -(-sum(width + 3 for *_, width in vectors) // page_numel) + 1
    pool = torch.full((num_pages + extra, page_numel), float("nan"), dtype=dtype, device=DEVICE)
    pool[:num_pages] = batch.pool
    flat = pool.view(-1)
    g_offsets = torch.full((NUM_SLOTS, NUM_LAYERS, NUM_MODULES), -1, dtype=torch.int64)
    cursor = num_pages * page_numel + 3  # odd: g need not be aligned
    for slot, layer, module, width in vectors:
        g = 1.0 + 0.25 * torch.randn(width, generator=generator)
        flat[cursor : cursor + width] = g.to(DEVICE, dtype)
        g_offsets[slot, layer, module] = cursor
        cursor += width + 3
    return dataclasses.replace(batch, pool=pool), g_offsets.to(DEVICE)


def dora_weights(
    batch: LoraBatch, group: Group, g_offsets: torch.Tensor, bias: torch.Tensor | None
) -> LoraWeights:
    modules = slice(group.first_module, group.first_module + len(group.widths))
    g_view = g_offsets[:, LAYER, modules]  # a strided view, as the engine binds it
    return dataclasses.replace(batch.weights(group), g_offsets=g_view, bias=bias)


def expand_inputs(
    batch: LoraBatch, group: Group, weights: LoraWeights, dtype: torch.dtype, generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (NaN past each token's rank) and the base output before the expand."""
    num_tokens = int(batch.segment_starts[-1])
    y = torch.randn(num_tokens, len(group.widths), batch.max_rank, generator=generator).to(DEVICE)
    slots = token_slots(batch)
    ranks = torch.where(slots[:, None] >= 0, weights.ranks[slots.clamp(min=0)], 0)
    y[torch.arange(batch.max_rank, device=DEVICE) >= ranks[..., None]] = float("nan")
    before = torch.randn(num_tokens, sum(group.widths), generator=generator).to(DEVICE, dtype)
    return y, before


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("group", [GROUPS[0], GROUPS[3]], ids=lambda group: group.name)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dora_expand_matches_reference(backend, group: Group, popularity, with_bias, generator):
    expand, dtype = backend
    batch, g_offsets = add_dora(make_batch(group, DECODE_MIX, popularity, dtype, generator),
                                group, dtype, generator)  # fmt: skip
    bias = torch.randn(sum(group.widths), generator=generator).to(DEVICE, dtype)
    weights = dora_weights(batch, group, g_offsets, bias if with_bias else None)
    y, before = expand_inputs(batch, group, weights, dtype, generator)
    out, expected, plain = before.clone(), before.clone(), before.clone()
    expand(out, y, weights, batch)
    reference.lora_expand(expected, y, weights, batch)
    assert_close(out, expected, dtype)
    # The same launch without a DoRA table: plain slots' rows are bit for bit what they were.
    expand(plain, y, dataclasses.replace(weights, g_offsets=None, bias=None), batch)
    slots = token_slots(batch)
    plain_tokens = ~torch.isin(slots, torch.tensor(DORA_SLOTS, device=DEVICE))
    assert torch.equal(out[plain_tokens], plain[plain_tokens])
    assert torch.equal(out[slots == NO_ADAPTER], before[slots == NO_ADAPTER])
    dora_tokens = torch.isin(slots, torch.tensor(DORA_SLOTS, device=DEVICE))
    assert dora_tokens.any()


@pytest.mark.parametrize("lengths", [DECODE_MIX, PREFILL], ids=["decode_mix", "prefill"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dora_expand_prefill_and_decode_tiles(backend, lengths, generator):
    """A qkv group with a bias (Qwen2's), all segments on DoRA slots or none."""
    expand, dtype = backend
    group = GROUPS[0]
    batch, g_offsets = add_dora(make_batch(group, lengths, "uniform", dtype, generator),
                                group, dtype, generator)  # fmt: skip
    batch.segment_slots.copy_(
        torch.tensor([DORA_SLOTS[i % 4] for i in range(len(lengths))], dtype=torch.int32)
    )
    batch.segment_slots[1] = NO_ADAPTER
    batch = dataclasses.replace(
        batch, max_rank=int(batch.ranks[batch.segment_slots[batch.segment_slots >= 0].long()].max())
    )
    bias = torch.randn(sum(group.widths), generator=generator).to(DEVICE, dtype)
    weights = dora_weights(batch, group, g_offsets, bias)
    y, before = expand_inputs(batch, group, weights, dtype, generator)
    out, expected = before.clone(), before.clone()
    expand(out, y, weights, batch)
    reference.lora_expand(expected, y, weights, batch)
    assert_close(out, expected, dtype)


def test_reference_is_g_times_w_x_plus_delta_plus_bias(generator):
    """The reference against DoRA's definition, y = g * (Wx + s BAx) + bias, in float64."""
    group = GROUPS[3]
    dtype = torch.float32
    batch, g_offsets = add_dora(make_batch(group, (3, 1, 4), "distinct", dtype, generator),
                                group, dtype, generator)  # fmt: skip
    batch.segment_slots.copy_(torch.tensor([2, NO_ADAPTER, 1], dtype=torch.int32))
    bias = torch.randn(group.widths[0], generator=generator).to(DEVICE)
    weights = dora_weights(batch, group, g_offsets, bias)
    y, before = expand_inputs(batch, group, weights, dtype, generator)
    out = before.clone()
    reference.lora_expand(out, y, weights, batch)
    flat = batch.pool.view(-1).double()
    for token, slot in enumerate(token_slots(batch).tolist()):
        if slot == NO_ADAPTER:
            assert torch.equal(out[token], before[token])
            continue
        rank = int(weights.ranks[slot, 0])
        b_offset = int(weights.b_offsets[slot, 0])
        b = flat[b_offset : b_offset + rank * group.widths[0]].view(rank, -1)
        delta = y[token, 0, :rank].double() @ b
        base = before[token].double()
        if slot in DORA_SLOTS:
            g_offset = int(weights.g_offsets[slot, 0])  # type: ignore[index]
            g = flat[g_offset : g_offset + group.widths[0]]
            expected = g * (base - bias.double() + delta) + bias.double()
        else:
            expected = base + delta
        torch.testing.assert_close(out[token].double(), expected, rtol=1e-5, atol=1e-5)


def test_launchers_reject_bad_dora_tables(generator):
    group = GROUPS[3]
    batch, g_offsets = add_dora(make_batch(group, (2, 2), "uniform", torch.float32, generator),
                                group, torch.float32, generator)  # fmt: skip
    weights = dora_weights(batch, group, g_offsets, None)
    y = torch.zeros(4, 1, batch.max_rank, device=DEVICE)
    out = torch.zeros(4, group.widths[0], device=DEVICE)
    wrong_table = dataclasses.replace(weights, g_offsets=g_offsets[:, LAYER, :2])
    wrong_bias = dataclasses.replace(weights, bias=torch.zeros(3, device=DEVICE))
    for expand in (triton_expand, native.lora_expand):  # the launchers that check shapes
        with pytest.raises(ValueError, match="g_offsets"):
            expand(out, y, wrong_table, batch)
        with pytest.raises(ValueError, match="bias"):
            expand(out, y, wrong_bias, batch)
