"""load_weights: the checkpoint's tensors by HF name, checked against the arch; bad folders refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import make_model
from safetensors.torch import load_file, save_file

from loraserve.errors import ModelLoadError
from loraserve.models.config import load_arch
from loraserve.models.weights import expected_weight_shapes, load_weights

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    """name -> (folder, transformers model); `llama-sharded` holds the same weights as `llama`."""
    specs: dict[str, dict[str, Any]] = {
        "llama": {"kind": "llama"},
        "llama-sharded": {"kind": "llama", "max_shard_size": "20KB"},
        "llama-bias": {"kind": "llama", "attention_bias": True},
        "qwen2": {"kind": "qwen2"},
        "mistral": {"kind": "mistral"},
        "qwen3-bias": {"kind": "qwen3", "attention_bias": True},
        "gemma2-tied": {"kind": "gemma2", "tie_word_embeddings": True},
        "gemma3": {"kind": "gemma3"},
        "phi3": {"kind": "phi3"},
        "phi4-mini": {"kind": "phi4-mini"},
    }
    built = {}
    for name, spec in specs.items():
        folder = tmp_path_factory.mktemp(name)
        built[name] = (folder, make_model(folder, **spec))
    return built


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def rewrite_checkpoint(
    folder: Path, drop: tuple[str, ...] = (), replace: dict[str, torch.Tensor] | None = None
) -> None:
    """Drop and replace tensors of folder/model.safetensors."""
    tensors = load_file(folder / "model.safetensors")
    for name in drop:
        del tensors[name]
    tensors.update(replace or {})
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


FAMILY_MODELS = ["llama", "llama-bias", "qwen2", "mistral", "qwen3-bias", "gemma2-tied"]
FAMILY_MODELS += ["gemma3", "phi3", "phi4-mini"]


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_weights_equal_the_model_state_dict(name: str, models: dict) -> None:
    folder, model = models[name]
    arch = load_arch(folder)
    weights = load_weights(folder, arch, torch.float32, CPU)
    state = model.state_dict()
    assert set(weights) == set(expected_weight_shapes(arch)) == set(state)
    for key, tensor in weights.items():
        assert tensor.dtype == torch.float32 and tensor.device == CPU
        assert torch.equal(tensor, state[key]), key


def test_biases_follow_the_arch(models: dict) -> None:
    qwen2 = expected_weight_shapes(load_arch(models["qwen2"][0]))
    assert "model.layers.1.self_attn.k_proj.bias" in qwen2
    assert "model.layers.1.self_attn.o_proj.bias" not in qwen2
    llama_bias = expected_weight_shapes(load_arch(models["llama-bias"][0]))
    assert llama_bias["model.layers.0.self_attn.o_proj.bias"] == (64,)
    llama = expected_weight_shapes(load_arch(models["llama"][0]))
    assert not any(name.endswith(".bias") for name in llama)


def test_expected_shapes_of_a_gqa_model(models: dict) -> None:
    arch = load_arch(models["mistral"][0])  # hidden 64, 4 heads, 2 kv heads, head_dim 16
    shapes = expected_weight_shapes(arch)
    attention = "model.layers.0.self_attn."
    assert shapes[attention + "q_proj.weight"] == (64, 64)
    assert shapes[attention + "k_proj.weight"] == (32, 64)
    assert shapes[attention + "o_proj.weight"] == (64, 64)
    assert shapes["model.layers.1.mlp.down_proj.weight"] == (64, 96)
    assert shapes["lm_head.weight"] == (arch.vocab_size, 64)
    assert len(shapes) == 1 + arch.num_layers * 9 + 2


def test_family_tensors(models: dict) -> None:
    """Qwen3's q/k norms and q/k/v/o biases, Gemma's four norms per layer, Phi-3's fused linears."""
    qwen3 = expected_weight_shapes(load_arch(models["qwen3-bias"][0]))
    assert qwen3["model.layers.0.self_attn.q_norm.weight"] == (16,)
    assert qwen3["model.layers.0.self_attn.o_proj.bias"] == (64,)
    gemma3 = expected_weight_shapes(load_arch(models["gemma3"][0]))
    assert gemma3["model.layers.1.post_feedforward_layernorm.weight"] == (64,)
    assert "model.layers.1.self_attn.k_norm.weight" in gemma3
    phi3 = expected_weight_shapes(load_arch(models["phi3"][0]))
    assert phi3["model.layers.0.self_attn.qkv_proj.weight"] == (64 + 2 * 32, 64)
    assert phi3["model.layers.0.mlp.gate_up_proj.weight"] == (2 * 96, 64)
    assert not any(name.endswith(("attn.q_proj.weight", "mlp.up_proj.weight")) for name in phi3)


def test_sharded_equals_single_file(models: dict) -> None:
    single, _ = models["llama"]
    sharded, _ = models["llama-sharded"]
    assert (sharded / "model.safetensors.index.json").is_file()
    assert not (sharded / "model.safetensors").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    arch = load_arch(single)
    assert load_arch(sharded) == arch
    from_single = load_weights(single, arch, torch.float32, CPU)
    from_shards = load_weights(sharded, arch, torch.float32, CPU)
    assert from_single.keys() == from_shards.keys()
    for name, tensor in from_single.items():
        assert torch.equal(tensor, from_shards[name]), name


def test_tied_embeddings_share_one_tensor(models: dict) -> None:
    folder, model = models["qwen2"]
    arch = load_arch(folder)
    assert arch.tie_word_embeddings
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")
    weights = load_weights(folder, arch, torch.float32, CPU)
    assert weights["lm_head.weight"] is weights["model.embed_tokens.weight"]
    assert torch.equal(weights["lm_head.weight"], model.lm_head.weight)


def test_tied_checkpoint_with_its_own_lm_head(models: dict, tmp_path: Path) -> None:
    """As transformers 5: a stored lm_head that differs from the embedding is used (untied)."""
    from transformers import AutoModelForCausalLM

    folder = copy_model(models["qwen2"][0], tmp_path / "model")
    embedding = load_file(folder / "model.safetensors")["model.embed_tokens.weight"]
    arch = load_arch(folder)
    rewrite_checkpoint(folder, replace={"lm_head.weight": embedding.clone()})
    weights = load_weights(folder, arch, torch.float32, CPU)
    assert weights["lm_head.weight"] is weights["model.embed_tokens.weight"]
    own_head = torch.randn(embedding.shape, generator=torch.Generator().manual_seed(0))
    rewrite_checkpoint(folder, replace={"lm_head.weight": own_head})
    weights = load_weights(folder, arch, torch.float32, CPU)
    reference = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(weights["lm_head.weight"], own_head)
    assert torch.equal(weights["lm_head.weight"], reference.lm_head.weight)


def test_converts_dtype(models: dict) -> None:
    folder, model = models["qwen2"]
    weights = load_weights(folder, load_arch(folder), torch.bfloat16, "cpu")
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    bias = "model.layers.0.self_attn.q_proj.bias"
    assert torch.equal(weights[bias], model.state_dict()[bias].to(torch.bfloat16))


def test_rotary_inv_freq_entries_are_ignored(models: dict, tmp_path: Path) -> None:
    folder = copy_model(models["llama"][0], tmp_path / "model")
    inv_freq = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    rewrite_checkpoint(folder, replace=inv_freq)
    weights = load_weights(folder, load_arch(folder), torch.float32, CPU)
    assert not any("inv_freq" in name for name in weights)


def test_missing_lm_head_when_not_tied(models: dict, tmp_path: Path) -> None:
    folder = copy_model(models["llama"][0], tmp_path / "model")
    rewrite_checkpoint(folder, drop=("lm_head.weight",))
    with pytest.raises(ModelLoadError, match=r"1 weights missing \(tie_word_embeddings is false\)"):
        load_weights(folder, load_arch(folder), torch.float32, CPU)


def test_missing_tensor_is_named(models: dict, tmp_path: Path) -> None:
    folder = copy_model(models["llama"][0], tmp_path / "model")
    gone = ("model.layers.1.mlp.up_proj.weight", "model.norm.weight")
    rewrite_checkpoint(folder, drop=gone)
    with pytest.raises(ModelLoadError) as error:
        load_weights(folder, load_arch(folder), torch.float32, CPU)
    assert "2 weights missing" in str(error.value)
    assert all(name in str(error.value) for name in gone)


def test_wrong_shape_is_named(models: dict, tmp_path: Path) -> None:
    folder = copy_model(models["llama"][0], tmp_path / "model")
    rewrite_checkpoint(folder, replace={"model.layers.1.mlp.down_proj.weight": torch.zeros(64, 95)})
    with pytest.raises(ModelLoadError) as error:
        load_weights(folder, load_arch(folder), torch.float32, CPU)
    assert "model.layers.1.mlp.down_proj.weight has shape [64, 95], expected [64, 96]" in str(
        error.value
    )


def test_config_that_does_not_match_the_weights(models: dict, tmp_path: Path) -> None:
    folder = copy_model(models["llama"][0], tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 2}))
    with pytest.raises(
        ModelLoadError, match=r"k_proj\.weight has shape \[64, 64\], expected \[32, 64\]"
    ):
        load_weights(folder, load_arch(folder), torch.float32, CPU)


def test_unexpected_tensors_are_refused(models: dict, tmp_path: Path) -> None:
    """Biases the config does not declare would be silently dropped: refuse instead."""
    source, _ = models["llama-bias"]
    folder = copy_model(source, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "attention_bias": False}))
    with pytest.raises(ModelLoadError, match=r"8 weights that config\.json does not describe"):
        load_weights(folder, load_arch(folder), torch.float32, CPU)


def test_pickle_only_folder_is_refused_without_unpickling(models: dict, tmp_path: Path) -> None:
    shutil.copy(models["llama"][0] / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(ModelLoadError, match=r"pytorch_model\*\.bin .*convert them to safetensors"):
        load_weights(tmp_path, load_arch(tmp_path), torch.float32, CPU)


def test_folder_without_weights(models: dict, tmp_path: Path) -> None:
    shutil.copy(models["llama"][0] / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelLoadError, match=r"has no weights: expected model\.safetensors"):
        load_weights(tmp_path, load_arch(tmp_path), torch.float32, CPU)


def test_index_naming_a_missing_shard(models: dict, tmp_path: Path) -> None:
    folder = copy_model(models["llama-sharded"][0], tmp_path / "model")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=f"names shard {shard.name}, which is missing"):
        load_weights(folder, load_arch(folder), torch.float32, CPU)


def test_not_a_folder(models: dict, tmp_path: Path) -> None:
    arch = load_arch(models["llama"][0])
    with pytest.raises(ModelLoadError, match="huggingface-cli download"):
        load_weights(tmp_path / "absent", arch, torch.float32, CPU)
