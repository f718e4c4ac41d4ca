"""rope_inv_freq / rope_attention_scaling against transformers' own rotary embeddings."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import make_model

from loraserve.models.config import load_arch
from loraserve.models.layers import rope_tables
from loraserve.models.rope import rope_attention_scaling, rope_inv_freq, use_long_rope

# Real sizes: head_dim 128 (Llama 3 8B), theta 500000, Llama 3.1's scaling at 8192.
ROPE_CASES: dict[str, dict[str, Any]] = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "default-llama3-theta": {"rope_type": "default", "rope_theta": 500000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "dynamic": {"rope_type": "dynamic", "rope_theta": 1000000.0, "factor": 2.5},
}


def assert_same_frequencies(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.dtype == torch.float32 and ours.shape == reference.shape
    torch.testing.assert_close(ours, reference.float(), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("case", ROPE_CASES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_matches_transformers_rotary_embedding(case: str, head_dim: int, tmp_path: Path) -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        num_hidden_layers=1,
        max_position_embeddings=16384,
        rope_parameters=dict(ROPE_CASES[case]),
    )
    config.save_pretrained(tmp_path)
    arch = load_arch(tmp_path)
    reference = LlamaRotaryEmbedding(config)
    assert_same_frequencies(rope_inv_freq(arch), reference.inv_freq)
    assert rope_attention_scaling(arch) == reference.attention_scaling


@pytest.mark.parametrize("case", ["linear", "llama3", "dynamic"])
def test_matches_rope_init_functions(case: str, tmp_path: Path) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=512,
        num_attention_heads=4,
        num_hidden_layers=1,
        max_position_embeddings=16384,
        rope_parameters=dict(ROPE_CASES[case]),
    )
    config.save_pretrained(tmp_path)
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[case](config, torch.device("cpu"))
    arch = load_arch(tmp_path)
    assert_same_frequencies(rope_inv_freq(arch), inv_freq)
    assert rope_attention_scaling(arch) == attention_scaling


def test_llama3_scaling_changes_low_frequencies_only(tmp_path: Path) -> None:
    """A test that can fail: llama3 keeps the highest frequency, divides the lowest by factor."""
    from transformers import LlamaConfig

    for name, case in (("default", "default-llama3-theta"), ("llama3", "llama3")):
        LlamaConfig(
            hidden_size=512,
            num_attention_heads=4,
            num_hidden_layers=1,
            rope_parameters=dict(ROPE_CASES[case]),
        ).save_pretrained(tmp_path / name)
    plain = rope_inv_freq(load_arch(tmp_path / "default"))
    scaled = rope_inv_freq(load_arch(tmp_path / "llama3"))
    assert scaled[0] == plain[0]
    torch.testing.assert_close(scaled[-1], plain[-1] / 8.0)


@pytest.mark.parametrize("kind", ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma2", "phi3"])
def test_matches_each_tiny_model(kind: str, tmp_path: Path) -> None:
    model = make_model(tmp_path, kind)
    assert_same_frequencies(rope_inv_freq(load_arch(tmp_path)), model.model.rotary_emb.inv_freq)


def test_gemma3_local_and_global_bases(tmp_path: Path) -> None:
    model = make_model(tmp_path, "gemma3")
    arch, rotary = load_arch(tmp_path), model.model.rotary_emb
    assert_same_frequencies(rope_inv_freq(arch), rotary.full_attention_inv_freq)
    assert_same_frequencies(rope_inv_freq(arch, local=True), rotary.sliding_attention_inv_freq)
    assert not torch.equal(rope_inv_freq(arch), rope_inv_freq(arch, local=True))


@pytest.mark.parametrize("long", [False, True])
def test_longrope_with_partial_rotary(long: bool, tmp_path: Path) -> None:
    """phi4-mini: 3/4 of head_dim 16 rotate; short or long factors; attention factor
    sqrt(1 + ln 4 / ln 128) (max 512 over original 128)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model = make_model(tmp_path, "phi4-mini")
    arch = load_arch(tmp_path)
    seq_len = 129 if long else None  # transformers picks the long factors past 128 tokens
    inv_freq, factor = ROPE_INIT_FUNCTIONS["longrope"](model.config, seq_len=seq_len)
    assert inv_freq.shape == (6,)
    assert_same_frequencies(rope_inv_freq(arch, long=long), inv_freq)
    assert rope_attention_scaling(arch) == factor == model.model.rotary_emb.attention_scaling
    assert factor == pytest.approx((1 + math.log(4) / math.log(128)) ** 0.5)
    assert use_long_rope(arch, 129) and not use_long_rope(arch, 128)


def test_rope_tables_are_transformers_cos_and_sin(tmp_path: Path) -> None:
    """What the forward gathers: transformers' cos/sin (whose two halves repeat) at every
    position, attention factor included."""
    model = make_model(tmp_path, "phi4-mini")
    (table,) = rope_tables(load_arch(tmp_path), 100, torch.device("cpu"), torch.float32)
    positions = torch.arange(100)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    torch.testing.assert_close(table[:, 0], cos[0, :, :6], rtol=0, atol=0)
    torch.testing.assert_close(table[:, 1], sin[0, :, 6:], rtol=0, atol=0)
