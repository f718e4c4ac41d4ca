"""The glue ops fused with the next projection group's LoRA shrink (kernels/add_rms_norm_shrink.py,
gated_activation_shrink.py) against the two ops they replace and against the references.

The fusion must not change numerics: the fused launch must give the norm's (or the
activation's) output bit for bit, the residual stream bit for bit, and the shrink of that
rounded output with the unfused decode shrink's accumulation. Under the interpreter both
are compared with `torch.equal`; on a GPU the fused norm's shrink runs with the norm's warps,
so its float32 y may differ from the unfused one's in the last bits (kernels/add_rms_norm_shrink.py).

Pools and batches are test_lora_kernels.py's (NaN pools, shuffled pages, ranks 1..128 and
untargeted slices mixed in one launch, NO_ADAPTER segments, four popularity mixes); sizes
are odd (hidden 1000 and 1376 = 43 * 32, not powers of two); every output the kernels
allocate starts as NaN. float32 and float16 only: the interpreter computes bfloat16 wrongly.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import triton
from test_lora_kernels import DECODE_MIX, DEVICE, PREFILL, Group, make_batch

from loraserve.bench.launches import counting_launches
from loraserve.kernels import native, reference
from loraserve.kernels.add_rms_norm import add_rms_norm, row_warps
from loraserve.kernels.add_rms_norm_shrink import add_rms_norm_shrink
from loraserve.kernels.dispatch import select_kernels
from loraserve.kernels.gated_activation import gated_activation
from loraserve.kernels.gated_activation_shrink import gated_activation_shrink
from loraserve.kernels.lora_shrink import lora_shrink
from loraserve.kernels.lora_tiles import DECODE_TILE_TOKENS, tiles_of
from loraserve.models.batch import LoraBatch

ON_GPU = torch.cuda.is_available()
TOLERANCES = {  # against the float32 references: (rtol, atol)
    torch.float32: (1e-4, 1e-4),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
EPS = 1e-6
SHRINK_WARPS = 4  # lora_shrink's decode programs'
# The shrink's input sizes, not powers of two: a hidden size (q/k/v, gate/up) and an
# intermediate one (down), 4096 and 11008 on a GPU.
QKV = Group("qkv", 0, 4096 if ON_GPU else 1000, (4096, 1024, 1024) if ON_GPU else (1000, 200, 200))
GATE_UP = Group("gate_up", 4, 4096 if ON_GPU else 1000, (11008,) * 2 if ON_GPU else (1376,) * 2)
DOWN = Group("down", 6, 11008 if ON_GPU else 1376, (4096,) if ON_GPU else (1000,))


@pytest.fixture
def generator(request: pytest.FixtureRequest) -> torch.Generator:
    """Fresh random numbers per test, the same on every run of that test."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.empty fills float tensors with NaN: outputs the kernels allocate start poisoned."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        tensor = empty(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", nan_empty)


def randn(*shape: int, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=generator).to(DEVICE, dtype)


def segments_of(
    group: Group,
    lengths: tuple[int, ...],
    popularity: str,
    dtype: torch.dtype,
    generator: torch.Generator,
    decode: bool = True,
):
    """A pool with adapters, and the batch's segments with the tile map the runner builds:
    `decode` gives every token its own tile (a decode step's map, whatever the segments)."""
    batch = make_batch(group, lengths, popularity, dtype, generator)
    tiles = tiles_of(batch.segment_starts, batch.segment_slots, decode=decode)
    segments = LoraBatch(batch.segment_starts, batch.segment_slots, batch.max_rank, tiles)
    return batch.weights(group), segments, int(batch.segment_starts[-1])


def assert_same_shrink(actual: torch.Tensor, unfused: torch.Tensor, same_warps: bool) -> None:
    """The interpreter, or a GPU program with the unfused shrink's warps: the same bits. Else
    the same within float32 rounding (the order inside a block follows the warps)."""
    if same_warps or not ON_GPU:
        assert torch.equal(actual, unfused), (actual - unfused).abs().max()
    else:
        torch.testing.assert_close(actual, unfused, rtol=1e-5, atol=1e-5)


def case(*values, gpu: bool = False):
    return pytest.param(*values, marks=[pytest.mark.gpu] if gpu else [])


# Every popularity, both dtypes, both groups, both kinds of weight, with and without delta.
NORM_CASES = [
    case("distinct", torch.float32, QKV, False, True),
    case("uniform", torch.float16, GATE_UP, True, True),
    case("zipf", torch.float16, QKV, False, False),
    case("identical", torch.float32, GATE_UP, True, False),
    case("zipf", torch.bfloat16, QKV, False, True, gpu=True),  # the interpreter's bf16 is wrong
]


@pytest.mark.parametrize(("popularity", "dtype", "group", "gemma", "with_delta"), NORM_CASES)
def test_add_rms_norm_shrink_is_the_norm_then_the_shrink(
    popularity, dtype, group, gemma, with_delta, generator
):
    weights, segments, num_tokens = segments_of(group, DECODE_MIX, popularity, dtype, generator)
    hidden = randn(num_tokens, group.in_dim, generator=generator, dtype=dtype)
    delta = (
        randn(num_tokens, group.in_dim, generator=generator, dtype=dtype) if with_delta else None
    )
    weight = randn(group.in_dim, generator=generator, dtype=torch.float32 if gemma else dtype)
    unfused_hidden = hidden.clone()
    x, y = add_rms_norm_shrink(hidden, delta, weight, EPS, weights, segments)
    unfused_x = add_rms_norm(unfused_hidden, delta, weight, EPS)
    assert torch.equal(hidden, unfused_hidden) and torch.equal(x, unfused_x)
    same_warps = row_warps(triton.next_power_of_2(group.in_dim)) == SHRINK_WARPS
    assert_same_shrink(y, lora_shrink(unfused_x, weights, segments), same_warps)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(
        y, reference.lora_shrink(unfused_x, weights, segments), rtol=rtol, atol=atol
    )


ACTIVATION_CASES = [
    case("distinct", torch.float32, "silu"),
    case("uniform", torch.float16, "gelu_pytorch_tanh"),
    case("zipf", torch.float16, "silu"),
    case("identical", torch.float32, "gelu_pytorch_tanh"),
    case("zipf", torch.bfloat16, "silu", gpu=True),
]


@pytest.mark.parametrize(("popularity", "dtype", "activation"), ACTIVATION_CASES)
def test_gated_activation_shrink_is_the_activation_then_the_shrink(
    popularity, dtype, activation, generator
):
    weights, segments, num_tokens = segments_of(DOWN, DECODE_MIX, popularity, dtype, generator)
    wider = randn(num_tokens, 2 * DOWN.in_dim + 5, generator=generator, dtype=dtype)
    gate_up = wider[:, 3 : 3 + 2 * DOWN.in_dim]  # a view with a wider row stride
    act, y = gated_activation_shrink(gate_up, activation, weights, segments)
    unfused_act = gated_activation(gate_up, activation)
    assert torch.equal(act, unfused_act)
    assert_same_shrink(y, lora_shrink(unfused_act, weights, segments), same_warps=True)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(
        y, reference.lora_shrink(unfused_act, weights, segments), rtol=rtol, atol=atol
    )


def test_a_decode_step_is_one_launch_and_prefill_keeps_two(generator):
    """Decode tile maps fuse; 16- and 64-token tiles go through the two plain kernels (their
    shrink multiplies tiles through tl.dot), with the same results as the reference's."""
    dtype = torch.float32
    fused = {"triton:_add_rms_norm_shrink_kernel": 1}
    unfused = {"triton:_add_rms_norm_kernel": 1, "triton:_lora_shrink_kernel": 1}
    for lengths, decode, launches in ((DECODE_MIX, True, fused), (PREFILL, False, unfused)):
        weights, segments, num_tokens = segments_of(QKV, lengths, "zipf", dtype, generator, decode)
        assert segments.tiles is not None
        assert (segments.tiles.tile_tokens == DECODE_TILE_TOKENS) == decode
        hidden = randn(num_tokens, QKV.in_dim, generator=generator, dtype=dtype)
        weight = randn(QKV.in_dim, generator=generator, dtype=dtype)
        expected_hidden = hidden.clone()
        with counting_launches() as counted:
            x, y = add_rms_norm_shrink(hidden, hidden.clone(), weight, EPS, weights, segments)
        outside = counted.count.outside  # the test's clone and poison fills besides
        assert {name: n for name, n in outside.items() if "triton" in name} == launches
        expected_x = reference.add_rms_norm(expected_hidden, expected_hidden.clone(), weight, EPS)
        torch.testing.assert_close(x, expected_x, rtol=1e-5, atol=1e-5)
        expected_y = reference.lora_shrink(expected_x, weights, segments)
        torch.testing.assert_close(y, expected_y, rtol=1e-4, atol=1e-4)


def test_tokens_past_the_tile_map_get_their_activation_and_zeros(generator):
    """A batch's rows past its segments (no tile: NO_ADAPTER) are computed, their y is 0."""
    dtype = torch.float16
    weights, segments, num_tokens = segments_of(DOWN, (1, 3, 2), "distinct", dtype, generator)
    extra = 3
    gate_up = randn(num_tokens + extra, 2 * DOWN.in_dim, generator=generator, dtype=dtype)
    act, y = gated_activation_shrink(gate_up, "silu", weights, segments)
    assert torch.equal(act, gated_activation(gate_up, "silu"))
    assert torch.equal(y[num_tokens:], torch.zeros_like(y[num_tokens:]))
    assert_same_shrink(y[:num_tokens], lora_shrink(act[:num_tokens], weights, segments), True)


@pytest.mark.parametrize("backend", ["reference", "torch", "native"])
def test_other_backends_compose_their_own_two_ops(backend, generator):
    """Only Triton fuses: the CPU backends run their norm (or activation), then their shrink,
    with the same bits as the two ops called one after the other."""
    if backend == "native" and not native.available():
        pytest.skip("no C compiler: the native kernels cannot be built")
    kernels = select_kernels(backend, "cpu", torch.float32)
    dtype = torch.float32
    weights, segments, num_tokens = segments_of(QKV, DECODE_MIX, "uniform", dtype, generator)
    hidden = randn(num_tokens, QKV.in_dim, generator=generator, dtype=dtype)
    delta = randn(num_tokens, QKV.in_dim, generator=generator, dtype=dtype)
    weight = randn(QKV.in_dim, generator=generator, dtype=dtype)
    unfused_hidden = hidden.clone()
    x, y = kernels.add_rms_norm_shrink(hidden, delta, weight, EPS, weights, segments)
    unfused_x = kernels.add_rms_norm(unfused_hidden, delta, weight, EPS)
    assert torch.equal(hidden, unfused_hidden) and torch.equal(x, unfused_x)
    assert torch.equal(y, kernels.lora_shrink(unfused_x, weights, segments))
    weights, segments, num_tokens = segments_of(DOWN, DECODE_MIX, "zipf", dtype, generator)
    gate_up = randn(num_tokens, 2 * DOWN.in_dim, generator=generator, dtype=dtype)
    act, y = kernels.gated_activation_shrink(gate_up, "silu", weights, segments)
    assert torch.equal(act, kernels.gated_activation(gate_up, "silu"))
    assert torch.equal(y, kernels.lora_shrink(act, weights, segments))


def test_triton_kernels_fuse():
    kernels = select_kernels("triton", "cpu")
    assert kernels.add_rms_norm_shrink is add_rms_norm_shrink
    assert kernels.gated_activation_shrink is gated_activation_shrink


def test_the_fused_ops_reject_bad_arguments(generator):
    weights, segments, num_tokens = segments_of(DOWN, (1, 1), "distinct", torch.float32, generator)
    hidden = randn(num_tokens, DOWN.in_dim, generator=generator, dtype=torch.float16)
    weight = torch.ones(DOWN.in_dim, dtype=torch.float16)
    with pytest.raises(ValueError, match="share a float dtype"):
        add_rms_norm_shrink(hidden, None, weight, EPS, weights, segments)
    with pytest.raises(ValueError, match="weight must be"):
        add_rms_norm_shrink(hidden.float(), None, weight[:7].float(), EPS, weights, segments)
    with pytest.raises(ValueError, match="activation must be"):
        gated_activation_shrink(hidden.float().repeat(1, 2), "relu", weights, segments)
