"""The fused glue kernels (add + RMSNorm, RoPE with the KV write, the gated activation)
against the torch references, which are the torch path's and native backend's code.

Inputs are views as the forward pass passes them (q/k/v column slices of the fused qkv
output, gate_up a slice of a wider buffer); sizes are odd; every output the kernels
allocate starts as NaN (`poisoned_empty`), as does the pool, so an element a kernel
forgets to write fails the comparison. Half precision follows torch's rounding step by
step, so float16 results must equal the reference's bit for bit where the kernel claims
it (RoPE, the add); the norm's and the activation's float32 arithmetic may differ from
torch's in the last bit, which rounding to float16 mostly hides.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from loraserve.kernels import reference
from loraserve.kernels.add_rms_norm import add_rms_norm
from loraserve.kernels.constants import ACTIVATIONS
from loraserve.kernels.gated_activation import gated_activation
from loraserve.kernels.rope_kv_write import rope_write_kv

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.gpu),  # the interpreter's bf16 is wrong
]
TOLERANCES = {  # (rtol, atol) of the norm and the activation: float32 math, then rounding
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}
EPS = 1e-6


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


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# -- add + RMSNorm -----------------------------------------------------------------------------

NORM_SHAPES = [(1, 37), (5, 96), (3, 4096), (17, 5120), (2, 8192)]  # (tokens, hidden)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda shape: f"{shape[0]}x{shape[1]}")
@pytest.mark.parametrize("gemma", [False, True], ids=["llama-weight", "gemma-1+w"])
@pytest.mark.parametrize("with_delta", [True, False], ids=["add", "norm-only"])
def test_add_rms_norm_matches_reference(shape, dtype, gemma, with_delta, generator):
    num_tokens, dim = shape
    # hidden is a column slice of a wider buffer (any row stride), delta a fresh tensor.
    wide = randn(num_tokens, dim + 11, generator=generator, dtype=dtype)
    hidden = wide[:, 3 : 3 + dim]
    delta = randn(num_tokens, dim, generator=generator, dtype=dtype) if with_delta else None
    stored = randn(dim, generator=generator, dtype=dtype)
    weight = 1.0 + stored.float() if gemma else stored  # models.layers.RMSNorm.weight
    expected_hidden = hidden.clone()
    expected = reference.add_rms_norm(expected_hidden, delta, weight, EPS)
    out = add_rms_norm(hidden, delta, weight, EPS)
    assert out.shape == hidden.shape and out.dtype == dtype
    torch.testing.assert_close(hidden, expected_hidden, rtol=0, atol=0)  # the add, exact
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_of_strided_q(dtype, generator):
    """Qwen3's and Gemma 3's q norm: [tokens, heads, head_dim], a view of the fused qkv."""
    num_tokens, num_heads, head_dim = 7, 5, 48
    qkv = randn(num_tokens, (num_heads + 4) * head_dim, generator=generator, dtype=dtype)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    weight = randn(head_dim, generator=generator, dtype=dtype)
    before = qkv.clone()
    out = add_rms_norm(q, None, weight, EPS)
    assert out.is_contiguous() and out.shape == q.shape
    assert_close(out, reference.rms_norm(q, weight, EPS), dtype)
    torch.testing.assert_close(qkv, before, rtol=0, atol=0)  # no delta: the input is not written


def test_add_rms_norm_rejects_bad_arguments(generator):
    hidden = randn(4, 32, generator=generator, dtype=torch.float16)
    weight = randn(32, generator=generator, dtype=torch.float16)
    with pytest.raises(ValueError, match="delta"):
        add_rms_norm(hidden, hidden[:2], weight, EPS)
    with pytest.raises(ValueError, match="weight"):
        add_rms_norm(hidden, None, weight[:31], EPS)
    with pytest.raises(ValueError, match="weight"):
        add_rms_norm(hidden, None, weight.to(torch.bfloat16), EPS)
    with pytest.raises(ValueError, match="unit stride"):
        add_rms_norm(hidden.t(), None, randn(4, generator=generator, dtype=torch.float16), EPS)


# -- RoPE + KV write ---------------------------------------------------------------------------

# (heads, kv_heads, head_dim, rotary_dim): MHA, GQA, Llama-3-8B's, Phi-4-mini's partial
# rotary (0.75 of 128), an odd head_dim with a partial rotary of odd half (and MQA).
ROPE_SHAPES = [
    (4, 4, 64, 64),
    (8, 2, 128, 128),
    (32, 8, 128, 128),
    (6, 2, 128, 96),
    (3, 1, 40, 22),
]
BLOCK_SIZE, NUM_PAGES = 16, 6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=lambda s: "h{}-kv{}-d{}-r{}".format(*s))
def test_rope_write_kv_matches_reference(shape, dtype, generator):
    num_heads, num_kv_heads, head_dim, rotary_dim = shape
    num_tokens = 9
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = randn(num_tokens, q_size + 2 * kv_size, generator=generator, dtype=dtype)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    query = q.view(num_tokens, num_heads, head_dim)  # views of qkv, as the model passes them
    key = k.view(num_tokens, num_kv_heads, head_dim)
    value = v.view(num_tokens, num_kv_heads, head_dim)
    angles = torch.rand(num_tokens, rotary_dim // 2, generator=generator) * 100
    cos_sin = torch.stack((angles.cos(), angles.sin()), dim=1).to(DEVICE, dtype)
    # A pool of two layers whose page stride is the pool's; NaN where nothing is written.
    pool = torch.full((NUM_PAGES, 2 * 2 * BLOCK_SIZE * kv_size), float("nan"), dtype=dtype)
    kv_pages = pool.to(DEVICE).view(NUM_PAGES, 2, 2, BLOCK_SIZE, num_kv_heads, head_dim)
    kv = kv_pages[:, 1]
    # Shuffled slots, two padding tokens (-1) whose K/V must not be written.
    slots = torch.randperm(NUM_PAGES * BLOCK_SIZE, generator=generator)[:num_tokens]
    slots[[2, 7]] = -1
    slots = slots.to(DEVICE)
    expected_kv = kv.clone()
    kept = slots >= 0
    reference.write_kv(
        expected_kv, reference.rope(key, *reference.angles(cos_sin))[kept], value[kept], slots[kept]
    )  # the reference writes every slot it is given: only the kept ones
    before = qkv.clone()
    out = rope_write_kv(query, key, value, cos_sin, kv, slots)
    exact = dtype != torch.float32  # rounded step by step as torch rounds
    tolerance = dict(rtol=0, atol=0) if exact else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, reference.rope(query, *reference.angles(cos_sin)), **tolerance)
    torch.testing.assert_close(kv, expected_kv, equal_nan=True, **tolerance)
    torch.testing.assert_close(kv_pages[:, 0], torch.full_like(kv, float("nan")), equal_nan=True)
    torch.testing.assert_close(qkv, before, rtol=0, atol=0)  # inputs untouched


def test_rope_write_kv_rejects_bad_arguments(generator):
    dtype = torch.float16
    query = randn(3, 4, 16, generator=generator, dtype=dtype)
    key = value = randn(3, 2, 16, generator=generator, dtype=dtype)
    kv = torch.zeros(2, 2, 4, 2, 16, dtype=dtype, device=DEVICE)
    slots = torch.arange(3, device=DEVICE)
    cos_sin = randn(3, 2, 8, generator=generator, dtype=dtype)
    with pytest.raises(ValueError, match="cos_sin"):
        rope_write_kv(
            query, key, value, randn(3, 2, 9, generator=generator, dtype=dtype), kv, slots
        )
    with pytest.raises(ValueError, match="share a float dtype"):
        rope_write_kv(query.float(), key, value, cos_sin, kv, slots)
    with pytest.raises(ValueError, match="query"):
        rope_write_kv(query[:2], key, value, cos_sin, kv, slots)


# -- SiLU / GELU-tanh * up -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(
    "shape", [(1, 45), (7, 688), (3, 2731), (2, 11008), (1, 14336)], ids=lambda s: f"{s[0]}x{s[1]}"
)
def test_gated_activation_matches_reference(shape, activation, dtype, generator):
    num_tokens, intermediate = shape
    # gate_up is a column slice of a wider buffer; large values reach the tails of exp.
    wide = randn(num_tokens, 2 * intermediate + 5, generator=generator, dtype=dtype) * 4
    gate_up = wide[:, 5:]
    out = gated_activation(gate_up, activation)
    assert out.shape == (num_tokens, intermediate) and out.is_contiguous()
    assert_close(out, reference.gated_activation(gate_up, activation), dtype)


def test_gated_activation_rejects_bad_arguments(generator):
    gate_up = randn(2, 10, generator=generator, dtype=torch.float16)
    with pytest.raises(ValueError, match="activation"):
        gated_activation(gate_up, "relu")
    with pytest.raises(ValueError, match="gate_up"):
        gated_activation(gate_up[:, :9], "silu")
