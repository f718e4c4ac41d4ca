"""models/hf_files.py, the one writer of model and adapter folders: what it writes reads
back, through models/hf_config.py, as the very ModelArch it was given."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from loraserve.models.hf_config import load_arch
from loraserve.models.hf_files import generation_config, llama_arch, llama_config, write_json

GQA = dict(
    vocab_size=300,
    hidden_size=96,
    intermediate_size=200,
    num_layers=3,
    num_heads=6,
    num_kv_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
)


def _write_configs(folder: Path, config: dict, generation: dict) -> None:
    write_json(folder / "config.json", config)
    write_json(folder / "generation_config.json", generation)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"rope_theta": 500000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
        {"head_dim": 32},  # heads x head_dim = 192 != hidden 96
    ],
)
def test_a_written_config_reads_back_as_the_same_arch(tmp_path: Path, changes: dict) -> None:
    arch = llama_arch(**GQA, **changes)
    _write_configs(tmp_path, llama_config(arch), generation_config(arch))
    assert load_arch(tmp_path) == arch
    head_dim = changes.get("head_dim", 16)
    assert arch.module_dims("k_proj") == (96, 2 * head_dim)
    assert arch.module_dims("o_proj") == (6 * head_dim, 96)


@pytest.mark.parametrize(
    "changes",
    [
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
        {"attention_bias": True},
        {"eos_token_ids": (2, 3)},
    ],
)
def test_what_the_writer_cannot_express_is_refused(changes: dict) -> None:
    arch = dataclasses.replace(llama_arch(**GQA), **changes)
    with pytest.raises(ValueError, match=r"plain Llama|one eos"):
        llama_config(arch)
