"""load_arch: every supported family parses as transformers reads it; everything else is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from factories import make_model

from loraserve.errors import ModelLoadError
from loraserve.models.arch import ModelArch
from loraserve.models.config import load_arch

KINDS = (
    "llama",
    "llama-gqa",
    "llama3",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "phi3",
    "phi4-mini",
)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    """kind -> (folder, transformers model) for every tiny model kind."""
    built = {}
    for kind in KINDS:
        folder = tmp_path_factory.mktemp(kind)
        built[kind] = (folder, make_model(folder, kind))
    return built


def config_only(source: Path, target: Path) -> Path:
    """A copy of a model folder's config.json and generation_config.json (all load_arch reads)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        shutil.copy(source / name, target / name)
    return target


def edit_config(folder: Path, **changes: Any) -> Path:
    """Set (value) or delete (None) keys of folder/config.json."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return folder


def hf_window(model: Any, layer: int) -> int:
    """The sliding window transformers applies in `layer`, 0 for none (Mistral and Phi-3
    read the config's for every layer; Llama has none)."""
    attention = model.model.layers[layer].self_attn
    window = getattr(attention, "sliding_window", getattr(model.config, "sliding_window", None))
    return window or 0


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_matches_the_transformers_model(kind: str, models: dict) -> None:
    folder, model = models[kind]
    config, attention = model.config, model.model.layers[0].self_attn
    arch = load_arch(folder)
    assert (arch.architecture, arch.model_type) == (config.architectures[0], config.model_type)
    assert arch.hidden_size == config.hidden_size
    assert arch.intermediate_size == config.intermediate_size
    assert arch.num_layers == config.num_hidden_layers
    assert (arch.num_heads, arch.num_kv_heads) == (
        config.num_attention_heads,
        config.num_key_value_heads,
    )
    assert arch.head_dim == attention.head_dim
    if arch.fused_projections:
        assert arch.q_size + 2 * arch.kv_size == attention.qkv_proj.out_features
        assert model.model.layers[0].mlp.gate_up_proj.out_features == 2 * arch.intermediate_size
    else:
        assert arch.q_size == attention.q_proj.out_features
        assert arch.kv_size == attention.k_proj.out_features
        assert arch.attention_bias == (attention.q_proj.bias is not None)
    assert arch.o_proj_bias == (attention.o_proj.bias is not None)
    assert arch.attention_scale == pytest.approx(attention.scaling, rel=1e-12)
    assert arch.qk_norm == hasattr(attention, "q_norm")
    assert arch.gemma_norms == hasattr(model.model.layers[0], "pre_feedforward_layernorm")
    assert arch.vocab_size == config.vocab_size
    assert arch.rms_norm_eps == config.rms_norm_eps
    assert arch.max_position_embeddings == config.max_position_embeddings
    rope = config.rope_parameters
    assert arch.rope_theta == rope.get("full_attention", rope)["rope_theta"]
    assert arch.tie_word_embeddings == config.tie_word_embeddings
    windows = [arch.layer_window(layer) for layer in range(arch.num_layers)]
    assert windows == [hf_window(model, layer) for layer in range(arch.num_layers)]
    assert arch.torch_dtype == "float32"
    assert arch.bos_token_id == config.bos_token_id == 0
    assert arch.eos_token_ids == (config.eos_token_id,) == (1,)


def test_gemma_specifics(models: dict) -> None:
    gemma2, gemma3 = load_arch(models["gemma2"][0]), load_arch(models["gemma3"][0])
    assert gemma2.hidden_act == gemma3.hidden_act == "gelu_pytorch_tanh"
    assert (gemma2.attn_logit_softcapping, gemma2.final_logit_softcapping) == (5.0, 8.0)
    assert gemma2.local_rope_theta is None
    assert (gemma3.attn_logit_softcapping, gemma3.final_logit_softcapping) == (None, None)
    assert (gemma3.rope_theta, gemma3.local_rope_theta) == (1_000_000.0, 10_000.0)
    assert gemma3.layer_windows == (12, 0)


def test_phi_specifics(models: dict) -> None:
    phi3, phi4 = load_arch(models["phi3"][0]), load_arch(models["phi4-mini"][0])
    assert phi3.fused_projections and phi3.linear_modules[0] == "qkv_proj"
    assert (phi3.rotary_dim, phi3.rope_scaling, phi3.layer_windows) == (16, None, (12, 12))
    assert (phi4.partial_rotary_factor, phi4.rotary_dim) == (0.75, 12)
    assert phi4.rope_scaling is not None and phi4.rope_scaling["rope_type"] == "longrope"
    assert phi4.rope_scaling["original_max_position_embeddings"] == 128
    assert phi4.layer_windows == () and phi4.tie_word_embeddings


def test_gemma3_old_form_config(models: dict, tmp_path: Path) -> None:
    """A Hub Gemma 3 config.json (gemma-3-1b's keys): rope_theta, rope_local_base_freq,
    rope_scaling for the global layers only, sliding_window_pattern, no layer_types."""
    from transformers import Gemma3TextConfig

    folder = config_only(models["gemma3"][0], tmp_path)
    scaling = {"rope_type": "linear", "factor": 8.0}
    edit_config(folder, rope_parameters=None, layer_types=None, num_hidden_layers=7)
    edit_config(folder, rope_theta=500_000.0, rope_local_base_freq=5_000.0, rope_scaling=scaling)
    edit_config(folder, sliding_window_pattern=3)
    arch = load_arch(folder)
    reference = Gemma3TextConfig.from_pretrained(folder)
    expected = [12 if kind == "sliding_attention" else 0 for kind in reference.layer_types]
    assert list(arch.layer_windows) == expected == [12, 12, 0, 12, 12, 0, 12]
    assert (arch.rope_theta, arch.local_rope_theta) == (500_000.0, 5_000.0)
    assert arch.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert reference.rope_parameters["full_attention"]["factor"] == 8.0
    assert "factor" not in reference.rope_parameters["sliding_attention"]


def test_rope_scaling_of_llama3(models: dict) -> None:
    folder, model = models["llama3"]
    arch = load_arch(folder)
    expected = {k: v for k, v in model.config.rope_parameters.items() if k != "rope_theta"}
    assert arch.rope_scaling == expected
    assert arch.rope_scaling["rope_type"] == "llama3"
    assert arch.rope_theta == 500000.0
    assert load_arch(models["llama"][0]).rope_scaling is None


def to_old_form(folder: Path, type_key: str) -> Path:
    """Rewrite config.json as transformers 4 wrote it: rope_theta + rope_scaling, torch_dtype."""
    config = json.loads((folder / "config.json").read_text())
    rope = dict(config.pop("rope_parameters"))
    if "sliding_attention" in rope:  # Gemma 3: a local base beside the global rope
        config["rope_local_base_freq"] = rope.pop("sliding_attention")["rope_theta"]
        rope = dict(rope.pop("full_attention"))
    config["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    config["rope_scaling"] = None if kind == "default" else {type_key: kind, **rope}
    config["torch_dtype"] = config.pop("dtype")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("type_key", ["rope_type", "type"])
@pytest.mark.parametrize("kind", KINDS)
def test_old_form_config_parses_to_the_same_arch(
    kind: str, type_key: str, models: dict, tmp_path: Path
) -> None:
    folder = models[kind][0]
    old = to_old_form(config_only(folder, tmp_path), type_key)
    assert "rope_parameters" not in json.loads((old / "config.json").read_text())
    assert load_arch(old) == load_arch(folder)


def test_model_type_stands_in_for_architectures(models: dict, tmp_path: Path) -> None:
    folder = edit_config(config_only(models["qwen2"][0], tmp_path), architectures=None)
    assert load_arch(folder) == load_arch(models["qwen2"][0])


def test_llama3_original_length_defaults_to_max_positions(models: dict, tmp_path: Path) -> None:
    folder = config_only(models["llama3"][0], tmp_path)
    rope = json.loads((folder / "config.json").read_text())["rope_parameters"]
    del rope["original_max_position_embeddings"]
    arch = load_arch(edit_config(folder, rope_parameters=rope))
    assert arch.rope_scaling is not None
    assert arch.rope_scaling["original_max_position_embeddings"] == arch.max_position_embeddings


def test_eos_ids_are_the_union_with_generation_config(models: dict, tmp_path: Path) -> None:
    folder = edit_config(config_only(models["llama"][0], tmp_path), eos_token_id=[1, 7])
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert load_arch(folder).eos_token_ids == (1, 7, 9)
    (folder / "generation_config.json").unlink()
    edit_config(folder, eos_token_id=None, bos_token_id=None)
    arch = load_arch(folder)
    assert (arch.bos_token_id, arch.eos_token_ids) == (None, ())


def test_head_dim_and_kv_heads_defaults(models: dict, tmp_path: Path) -> None:
    folder = edit_config(config_only(models["llama"][0], tmp_path), head_dim=None)
    edit_config(folder, num_key_value_heads=None)
    arch = load_arch(folder)
    assert (arch.head_dim, arch.num_kv_heads) == (64 // 4, 4)
    assert load_arch(edit_config(folder, head_dim=32)).head_dim == 32


def test_llama_attention_bias_means_q_k_v_and_o_biases(models: dict, tmp_path: Path) -> None:
    arch = load_arch(edit_config(config_only(models["llama"][0], tmp_path), attention_bias=True))
    assert arch.attention_bias and arch.o_proj_bias
    qwen2 = load_arch(models["qwen2"][0])
    assert qwen2.attention_bias and not qwen2.o_proj_bias
    mistral = edit_config(config_only(models["mistral"][0], tmp_path / "m"), attention_bias=True)
    assert not load_arch(mistral).attention_bias  # MistralAttention has no biases


def test_sliding_windows(models: dict, tmp_path: Path) -> None:
    assert load_arch(models["mistral"][0]).layer_windows == (4096, 4096)
    mistral = config_only(models["mistral"][0], tmp_path / "mistral")
    assert load_arch(edit_config(mistral, sliding_window=None)).layer_windows == (4096, 4096)
    qwen2 = config_only(models["qwen2"][0], tmp_path)
    assert load_arch(qwen2).layer_windows == ()  # use_sliding_window is false
    edit_config(qwen2, use_sliding_window=True, sliding_window=128, max_window_layers=0)
    edit_config(qwen2, layer_types=None)
    assert load_arch(qwen2).layer_windows == (128, 128)
    edit_config(qwen2, max_window_layers=2)
    assert load_arch(qwen2).layer_windows == ()  # no layer at or past max_window_layers
    assert load_arch(edit_config(qwen2, max_window_layers=1)).layer_windows == (0, 128)
    edit_config(qwen2, layer_types=["sliding_attention", "full_attention"])
    assert load_arch(qwen2).layer_windows == (128, 0)  # layer_types wins
    with pytest.raises(ModelLoadError, match="layer_types must list 2"):
        load_arch(edit_config(qwen2, layer_types=["sliding_attention"]))


def test_not_a_folder(tmp_path: Path) -> None:
    missing = tmp_path / "meta-llama" / "Llama-3.1-8B"
    with pytest.raises(ModelLoadError) as error:
        load_arch(missing)
    message = str(error.value)
    assert str(missing) in message and "huggingface-cli download" in message
    assert "local" in message
    (tmp_path / "file").write_text("")
    with pytest.raises(ModelLoadError, match="huggingface-cli download"):
        load_arch(tmp_path / "file")


def test_missing_config_json(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"config\.json not found"):
        load_arch(tmp_path)


def test_config_json_that_is_not_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"cannot read .*config\.json"):
        load_arch(tmp_path)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"architectures": ["GPT2LMHeadModel"]},
            "'GPT2LMHeadModel' is not supported; loraserve runs LlamaForCausalLM, "
            "MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM, "
            "Gemma3ForCausalLM, Phi3ForCausalLM",
        ),
        (
            {"architectures": ["Gemma3ForConditionalGeneration"]},
            "'Gemma3ForConditionalGeneration' is not supported; loraserve runs",
        ),
        ({"architectures": None, "model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
        ({"hidden_size": None}, "hidden_size must be a positive integer, got None"),
        ({"num_hidden_layers": "2"}, "num_hidden_layers must be a positive integer"),
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
            "rope type 'yarn' is not supported; supported: default, linear, llama3, dynamic",
        ),
        (
            {"rope_parameters": None, "rope_scaling": {"type": "longrope", "short_factor": [1]}},
            "rope type 'longrope' needs long_factor, original_max_position_embeddings",
        ),
        (
            {
                "rope_parameters": None,
                "original_max_position_embeddings": 8,
                "rope_scaling": {"type": "su", "short_factor": [1.0], "long_factor": [1.0]},
            },
            "longrope's short_factor must be a list of rotary_dim / 2 = 8 numbers",
        ),
        ({"sliding_window": 0, "architectures": ["MistralForCausalLM"]}, "sliding_window must"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "'linear' needs factor"),
    ],
)
def test_refused_configs(changes: dict, expected: str, models: dict, tmp_path: Path) -> None:
    folder = edit_config(config_only(models["llama"][0], tmp_path), **changes)
    with pytest.raises(ModelLoadError) as error:
        load_arch(folder)
    assert expected in str(error.value)
    assert "config.json" in str(error.value)


@pytest.mark.parametrize(
    ("kind", "changes", "expected"),
    [
        ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ("gemma2", {"hidden_activation": "gelu"}, "hidden_activation 'gelu' is not supported"),
        ("gemma2", {"attn_logit_softcapping": -1}, "attn_logit_softcapping must be a positive"),
        (
            "gemma3",
            {"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
            "rope scaling of the sliding-window layers is not supported",
        ),
        ("phi4-mini", {"partial_rotary_factor": 1.5}, "partial_rotary_factor must be in"),
    ],
)
def test_refused_family_configs(
    kind: str, changes: dict, expected: str, models: dict, tmp_path: Path
) -> None:
    folder = edit_config(config_only(models[kind][0], tmp_path), **changes)
    if kind == "phi4-mini":  # the factor lives in rope_parameters too
        rope = json.loads((folder / "config.json").read_text())["rope_parameters"]
        edit_config(folder, rope_parameters={**rope, **changes})
    with pytest.raises(ModelLoadError, match=expected):
        load_arch(folder)


def test_arch_is_a_frozen_record(models: dict) -> None:
    arch = load_arch(models["llama-gqa"][0])
    assert isinstance(arch, ModelArch)
    assert (arch.num_heads, arch.num_kv_heads) == (4, 2)
    with pytest.raises(AttributeError):
        arch.hidden_size = 1  # type: ignore[misc]
