"""The Triton LoRA shrink/expand kernels, and the CPU path's, against the torch
references (punica style).

Every test builds a real unified pool: NaN everywhere, adapter matrices written
at shuffled, non-contiguous pages (several small matrices may share a page), an
offset table `[num_slots, num_layers, num_modules, 2]` and a rank table, and
passes the per-layer strided views the engine passes. Ranks {1, 7, 8, 16, 33,
64, 128} and untargeted slices are mixed in one launch; batches mix one-token
segments, long ones and NO_ADAPTER runs; adapter popularity is distinct,
uniform, zipf or identical. Under TRITON_INTERPRET=1 (no CUDA) the model
dimensions are scaled down, keeping their odd factors (11008 = 43 * 256 -> 1376).
"""

from __future__ import annotations

import dataclasses
import itertools
import zlib
from dataclasses import dataclass

import pytest
import torch

from loraserve.kernels import native, reference, torch_path
from loraserve.kernels.constants import NO_ADAPTER
from loraserve.kernels.dispatch import select_kernels
from loraserve.kernels.lora_expand import lora_expand
from loraserve.kernels.lora_shrink import lora_shrink
from loraserve.kernels.ops import LoraWeights, OutputSlices

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.gpu),  # the interpreter's bf16 is wrong
]
TOLERANCES = {  # float32 sums in every case; the differences are the inputs' and out's rounding
    torch.float32: (1e-4, 1e-4),  # (rtol, atol)
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
RANKS = (1, 7, 8, 16, 33, 64, 128)
NUM_SLOTS, NUM_LAYERS, NUM_MODULES, LAYER = 8, 3, 7, 1


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@dataclass(frozen=True)
class Group:
    """One fused projection: its input size and the output size of each slice."""

    name: str
    first_module: int
    in_dim: int
    widths: tuple[int, ...]

    def slices(self, device: torch.device = DEVICE) -> OutputSlices:
        """Where each slice's output begins, as the model makes it once per projection."""
        return OutputSlices.of([0, *itertools.accumulate(self.widths)], device)


# Llama-2-7B / Llama-3-8B shapes on a GPU; under the interpreter scaled down by a power of two.
GROUPS = [
    Group("qkv-llama3", 0, 4096, (4096, 1024, 1024) if ON_GPU else (1024, 256, 256)),
    Group("qkv-llama2", 0, 4096 if ON_GPU else 1024, (4096, 4096, 4096) if ON_GPU else (512,) * 3),
    Group("gate_up-llama2", 4, 4096 if ON_GPU else 512, (11008, 11008) if ON_GPU else (1376, 1376)),
    Group("down-llama3", 6, 14336 if ON_GPU else 1792, (4096,) if ON_GPU else (640,)),
]
POPULARITIES = ["distinct", "uniform", "zipf", "identical"]
# Token counts of the segments: one-token runs (decode) beside long ones (prefill chunks);
# segments 3 and 7 use no adapter. The second batch is prefill-shaped (64-token tiles).
DECODE_MIX = (1, 1, 19, 1, 2, 9, 1, 3)
PREFILL = (70, 1, 45)
NO_ADAPTER_SEGMENTS = {3, 7}


@dataclass
class LoraBatch:
    """A pool with adapters in it and a batch of segments (a `kernels.ops.Segments`), as the
    engine hands them over."""

    pool: torch.Tensor  # [num_pages, page_numel], NaN where nothing was written
    offsets: torch.Tensor  # [NUM_SLOTS, NUM_LAYERS, NUM_MODULES, 2] int64
    ranks: torch.Tensor  # [NUM_SLOTS, NUM_LAYERS, NUM_MODULES] int32
    segment_starts: torch.Tensor  # [num_segments + 1] int32
    segment_slots: torch.Tensor  # [num_segments] int32
    max_rank: int

    def weights(self, group: Group) -> LoraWeights:
        """The tested layer's weights of `group`: strided views of the tables, as the model binds."""
        modules = slice(group.first_module, group.first_module + len(group.widths))
        offsets, ranks = self.offsets[:, LAYER, modules], self.ranks[:, LAYER, modules]
        return LoraWeights(self.pool, offsets[..., 0], offsets[..., 1], ranks, group.slices())


@pytest.fixture
def generator(request: pytest.FixtureRequest) -> torch.Generator:
    """Fresh random numbers per test, the same on every run of that test."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


def slot_ranks(slot: int, num_slices: int) -> list[int]:
    """Each slot gets a different rank per slice; a few slices are not targeted (rank 0)."""
    ranks = [RANKS[(slot + 3 * index) % len(RANKS)] for index in range(num_slices)]
    if slot == 5 and num_slices > 1:
        ranks[1] = 0
    if slot == 6:
        ranks[0] = 0
    return ranks


def choose_slots(popularity: str, num_segments: int, generator: torch.Generator) -> list[int]:
    """Adapter slot of each segment (NO_ADAPTER for the base-model ones)."""
    if popularity == "distinct":
        slots = list(range(num_segments))
    elif popularity == "uniform":
        slots = torch.randint(0, NUM_SLOTS, (num_segments,), generator=generator).tolist()
    elif popularity == "zipf":
        weights = 1.0 / torch.arange(1, NUM_SLOTS + 1, dtype=torch.float64) ** 1.5
        slots = torch.multinomial(weights, num_segments, True, generator=generator).tolist()
    else:
        slots = [2] * num_segments
    return [
        NO_ADAPTER if index in NO_ADAPTER_SEGMENTS else slot % NUM_SLOTS
        for index, slot in enumerate(slots)
    ]


def make_batch(
    group: Group,
    lengths: tuple[int, ...],
    popularity: str,
    dtype: torch.dtype,
    generator: torch.Generator,
) -> LoraBatch:
    """Write A and B of every (slot, slice) of every layer into shuffled pages of a NaN pool."""
    matrices = []  # (slot, layer, module, A or B, rank, row length)
    ranks = torch.zeros(NUM_SLOTS, NUM_LAYERS, NUM_MODULES, dtype=torch.int32)
    for slot in range(NUM_SLOTS):
        for layer in range(NUM_LAYERS):
            layer_ranks = slot_ranks((slot + layer) % NUM_SLOTS, len(group.widths))
            for index, (rank, width) in enumerate(zip(layer_ranks, group.widths, strict=True)):
                module = group.first_module + index
                ranks[slot, layer, module] = rank
                matrices += [
                    (slot, layer, module, 0, rank, group.in_dim),
                    (slot, layer, module, 1, rank, width),
                ]
    page_numel = max(rank * length for *_, rank, length in matrices) + 7  # + 7: odd in-page offsets
    num_pages = len(matrices) // 2 + 4
    pool = torch.full((num_pages, page_numel), float("nan"), dtype=dtype)
    offsets = torch.full((NUM_SLOTS, NUM_LAYERS, NUM_MODULES, 2), -1, dtype=torch.int64)
    pages = iter(torch.randperm(num_pages, generator=generator).tolist())
    page, used = next(pages), 7
    for slot, layer, module, which, rank, length in matrices:
        if rank == 0:
            continue
        if used + rank * length > page_numel:  # never straddle two pages
            page, used = next(pages), int(torch.randint(0, 8, (), generator=generator))
        scale = (group.in_dim if which == 0 else rank) ** -0.5  # keeps y and the delta near 1
        values = torch.randn(rank * length, generator=generator) * scale
        pool[page, used : used + rank * length] = values.to(dtype)
        offsets[slot, layer, module, which] = page * page_numel + used
        used += rank * length
    slots = choose_slots(popularity, len(lengths), generator)
    used_slots = [slot for slot in slots if slot != NO_ADAPTER]
    modules = slice(group.first_module, group.first_module + len(group.widths))
    max_rank = int(ranks[used_slots, LAYER, modules].max()) if used_slots else 1
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return LoraBatch(
        pool.to(DEVICE),
        offsets.to(DEVICE),
        ranks.to(DEVICE),
        starts.to(DEVICE),
        torch.tensor(slots, dtype=torch.int32, device=DEVICE),
        max_rank,
    )


def token_slots(batch: LoraBatch) -> torch.Tensor:
    """[num_tokens] adapter slot of every token."""
    lengths = batch.segment_starts.diff().long()
    return batch.segment_slots.long().repeat_interleave(lengths)


def run_shrink(
    group: Group, batch: LoraBatch, dtype: torch.dtype, generator: torch.Generator, **kwargs
):
    num_tokens = int(batch.segment_starts[-1])
    x = torch.randn(num_tokens, group.in_dim, generator=generator).to(DEVICE, dtype)
    weights = batch.weights(group)
    y = torch.full((num_tokens, len(group.widths), batch.max_rank), float("nan"), device=DEVICE)
    lora_shrink(x, weights, batch, out=y, **kwargs)
    return y, reference.lora_shrink(x, weights, batch)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("group", GROUPS, ids=lambda group: group.name)
def test_shrink_matches_reference(group: Group, popularity: str, dtype: torch.dtype, generator):
    batch = make_batch(group, DECODE_MIX, popularity, dtype, generator)
    y, expected = run_shrink(group, batch, dtype, generator)
    assert_close(y, expected, dtype)


@pytest.mark.parametrize("lengths", [DECODE_MIX, PREFILL], ids=["decode_mix", "prefill"])
def test_shrink_writes_every_element_of_a_fresh_y(lengths: tuple[int, ...], generator):
    """No zeroing launch: y from torch.empty (here NaN) comes back fully written."""
    batch = make_batch(GROUPS[1], lengths, "uniform", torch.float32, generator)
    x = torch.randn(sum(lengths), GROUPS[1].in_dim, generator=generator).to(DEVICE)
    y = lora_shrink(x, batch.weights(GROUPS[1]), batch)
    assert_close(y, reference.lora_shrink(x, batch.weights(GROUPS[1]), batch), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [GROUPS[1], GROUPS[3]], ids=lambda group: group.name)
def test_shrink_prefill_tiles(group: Group, dtype: torch.dtype, generator):
    batch = make_batch(group, PREFILL, "distinct", dtype, generator)
    y, expected = run_shrink(group, batch, dtype, generator)
    assert_close(y, expected, dtype)


def run_expand(group: Group, batch: LoraBatch, dtype: torch.dtype, generator: torch.Generator):
    """(out after the kernel, out after the reference, out before both)."""
    num_tokens, num_slices = int(batch.segment_starts[-1]), len(group.widths)
    weights = batch.weights(group)
    y = torch.randn(num_tokens, num_slices, batch.max_rank, generator=generator).to(DEVICE)
    # NaN past each token's rank (and everywhere for base-model tokens): never to be read.
    slots = token_slots(batch)
    ranks = torch.where(
        slots[:, None] >= 0, weights.ranks[slots.clamp(min=0)], 0
    )  # [tokens, slices]
    y[torch.arange(batch.max_rank, device=DEVICE) >= ranks[..., None]] = float("nan")
    before = torch.randn(num_tokens, sum(group.widths), generator=generator).to(DEVICE, dtype)
    out, expected = before.clone(), before.clone()
    lora_expand(out, y, weights, batch)
    reference.lora_expand(expected, y, weights, batch)
    return out, expected, before


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("group", GROUPS, ids=lambda group: group.name)
def test_expand_matches_reference(group: Group, popularity: str, dtype: torch.dtype, generator):
    batch = make_batch(group, DECODE_MIX, popularity, dtype, generator)
    out, expected, before = run_expand(group, batch, dtype, generator)
    assert_close(out, expected, dtype)
    base_tokens = token_slots(batch) == NO_ADAPTER
    assert torch.equal(out[base_tokens], before[base_tokens])  # bit for bit


@pytest.mark.parametrize("lengths", [DECODE_MIX, PREFILL], ids=["decode_mix", "prefill"])
def test_expand_decode_and_prefill_tiles(lengths: tuple[int, ...], generator):
    group = GROUPS[0]
    batch = make_batch(group, lengths, "zipf", torch.float16, generator)
    out, expected, _ = run_expand(group, batch, torch.float16, generator)
    assert_close(out, expected, torch.float16)


@pytest.mark.parametrize("starts", [[], [0], [1, 5], [0, 5, 5], [0, 7, 3]])
def test_output_slices_must_increase_from_zero(starts: list[int]):
    with pytest.raises(ValueError, match="slice_starts"):
        OutputSlices.of(starts, DEVICE)
    slices = OutputSlices.of([0, 4096, 5120, 6144], DEVICE)
    assert slices.widest == 4096 and slices.tensor.tolist() == list(slices.starts)


def test_no_adapter_batch_is_zero_and_untouched(generator):
    group = GROUPS[3]
    batch = make_batch(group, (3, 1, 20), "uniform", torch.float32, generator)
    batch.segment_slots.fill_(NO_ADAPTER)
    y, expected = run_shrink(group, batch, torch.float32, generator)
    assert torch.equal(y, torch.zeros_like(y)) and torch.equal(expected, y)
    out, _, before = run_expand(group, batch, torch.float32, generator)
    assert torch.equal(out, before)


def test_launchers_reject_bad_inputs(generator):
    group = GROUPS[3]
    batch = make_batch(group, (2, 2), "uniform", torch.float32, generator)
    weights = batch.weights(group)
    x = torch.randn(4, group.in_dim, dtype=torch.float16, device=DEVICE)  # pool is float32
    with pytest.raises(ValueError, match="dtype"):
        lora_shrink(x, weights, batch)
    y = torch.zeros(4, 1, 8, device=DEVICE)
    out = torch.zeros(4, group.widths[0], device=DEVICE)
    narrow = dataclasses.replace(weights, slices=OutputSlices.of([0, 5], DEVICE))  # not out's
    with pytest.raises(ValueError, match="slice_starts"):
        lora_expand(out, y, narrow, batch)


def test_dispatch_selects_these_kernels():
    kernels = select_kernels("triton", DEVICE)
    assert kernels.name == "triton" and kernels.reads_tile_map
    assert kernels.lora_shrink is lora_shrink and kernels.lora_expand is lora_expand


# The CPU paths: kernels/torch_path.py (torch, any dtype) and kernels/native.py (C, float32 only).
CPU_PATHS = [
    pytest.param((torch_path, dtype), id=f"torch-{str(dtype)[6:]}")
    for dtype in (torch.float32, torch.float16)
] + [pytest.param((native, torch.float32), id="native-float32")]


@pytest.mark.parametrize("lengths", [DECODE_MIX, PREFILL], ids=["decode_mix", "prefill"])
@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("path", CPU_PATHS)
def test_cpu_path_matches_reference(path, popularity: str, lengths, generator):
    """kernels/torch_path.py and kernels/native.py: the references' products, weights read in place."""
    implementation, dtype = path
    group = GROUPS[0]
    batch = make_batch(group, lengths, popularity, dtype, generator)
    num_tokens = int(batch.segment_starts[-1])
    x = torch.randn(num_tokens, group.in_dim, generator=generator).to(DEVICE, dtype)
    weights = batch.weights(group)
    y = implementation.lora_shrink(x, weights, batch)
    expected_y = reference.lora_shrink(x, weights, batch)
    assert_close(y, expected_y, dtype)
    before = torch.randn(num_tokens, sum(group.widths), generator=generator).to(DEVICE, dtype)
    out, expected = before.clone(), before.clone()
    for kernels, target in ((implementation, out), (reference, expected)):
        kernels.lora_expand(target, expected_y, weights, batch)
    assert_close(out, expected, dtype)
    base_tokens = token_slots(batch) == NO_ADAPTER
    assert torch.equal(out[base_tokens], before[base_tokens])


@pytest.mark.parametrize("implementation", [torch_path, native], ids=["torch", "native"])
def test_cpu_path_reads_what_the_pool_holds_now(implementation, generator):
    """Nothing is cached across calls: a slot refilled with another adapter must show."""
    group = GROUPS[3]
    batch = make_batch(group, (2, 3), "uniform", torch.float32, generator)
    x = torch.randn(5, group.in_dim, generator=generator).to(DEVICE)
    weights = batch.weights(group)
    first = implementation.lora_shrink(x, weights, batch)
    batch.pool.mul_(2.0)  # NaN stays NaN; every stored matrix doubles
    assert_close(implementation.lora_shrink(x, weights, batch), 2 * first, torch.float32)


def test_dispatch_selects_the_cpu_path_on_cpu():
    kernels = select_kernels("auto", "cpu")
    assert kernels.name == "torch" and kernels.lora_shrink is torch_path.lora_shrink
    assert not kernels.reads_tile_map  # the CPU kernels read the segments alone
    assert select_kernels("reference", "cpu").lora_shrink is reference.lora_shrink
