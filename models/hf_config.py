"""Read a local Hugging Face model folder's `config.json` into a `ModelArch`.

Both config forms are read: transformers 5 writes `rope_parameters`, `layer_types` and
`dtype`, older folders `rope_theta` + `rope_scaling`, per-family window keys and
`torch_dtype`. What a family's keys mean is `models/families.py`; the RoPE keys are
`models/rope_config.py`. Anything loraserve would run differently from transformers
(another architecture, activation, rope type, MLP biases, bidirectional attention) is
refused here with a `ModelLoadError`, before a single weight is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loraserve.errors import ModelLoadError
from loraserve.kernels.constants import ACTIVATIONS
from loraserve.models.arch import ModelArch
from loraserve.models.families import FAMILIES, FAMILY_OF_MODEL_TYPE, FULL, SLIDING, Family
from loraserve.models.rope_config import read_rope

GEMMA_QUERY_PRE_ATTN_SCALAR = 256  # Gemma2Config / Gemma3TextConfig default


def model_folder(folder: str | Path) -> Path:
    """`folder` as a Path, or ModelLoadError if it is not an existing local folder."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"model folder {str(folder)!r} does not exist or is not a folder; loraserve loads only "
            "local Hugging Face folders: download the model first, e.g. with "
            f"`huggingface-cli download MODEL_ID --local-dir {folder}`"
        )
    return path


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or ModelLoadError naming the file when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from error
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return data


def load_arch(folder: str | Path) -> ModelArch:
    """Parse `folder/config.json` (and `generation_config.json` for EOS ids) into a ModelArch."""
    path = model_folder(folder)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(
            f"{config_path} not found: a Hugging Face model folder has a config.json"
        )
    config = read_json(config_path)
    family = _family(config, config_path)
    _check_unsupported_features(config, family, config_path)
    num_heads = _positive_int(config, "num_attention_heads", config_path)
    num_kv_heads = _optional_int(config, "num_key_value_heads", config_path) or num_heads
    if num_heads % num_kv_heads:
        raise ModelLoadError(
            f"{config_path}: num_attention_heads={num_heads} is not a multiple of "
            f"num_key_value_heads={num_kv_heads}"
        )
    hidden_size = _positive_int(config, "hidden_size", config_path)
    head_dim = _optional_int(config, "head_dim", config_path) or hidden_size // num_heads
    num_layers = _positive_int(config, "num_hidden_layers", config_path)
    rope = read_rope(config, family, head_dim, config_path)
    bos_token_id, eos_token_ids = _special_token_ids(config, path)
    biased = family.biases == "qkv" or (
        family.biases == "attention_bias" and bool(config.get("attention_bias", False))
    )
    return ModelArch(
        architecture=family.architecture,
        model_type=family.model_type,
        hidden_size=hidden_size,
        intermediate_size=_positive_int(config, "intermediate_size", config_path),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        vocab_size=_positive_int(config, "vocab_size", config_path),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=rope.rope_theta,
        max_position_embeddings=_positive_int(config, "max_position_embeddings", config_path),
        rope_scaling=rope.rope_scaling,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", family.gemma)),
        attention_bias=biased,
        o_proj_bias=biased and family.biases == "attention_bias",
        layer_windows=_layer_windows(config, family, num_layers, config_path),
        torch_dtype=str(config.get("dtype") or config.get("torch_dtype") or "float32"),
        bos_token_id=bos_token_id,
        eos_token_ids=eos_token_ids,
        hidden_act=config.get(family.activation_key, family.default_activation),
        fused_projections=family.fused_projections,
        qk_norm=family.qk_norm,
        gemma_norms=family.gemma,
        query_pre_attn_scalar=_query_pre_attn_scalar(config, family, config_path),
        attn_logit_softcapping=_softcap(config, family, "attn_logit_softcapping", config_path),
        final_logit_softcapping=_softcap(config, family, "final_logit_softcapping", config_path),
        local_rope_theta=rope.local_rope_theta,
        partial_rotary_factor=rope.partial_rotary_factor,
    )


def _family(config: dict[str, Any], config_path: Path) -> Family:
    """The family of `architectures[0]`, or else of `model_type`."""
    supported = ", ".join(FAMILIES)
    architectures = config.get("architectures")
    if architectures:
        architecture = architectures[0] if isinstance(architectures, list) else architectures
        if architecture not in FAMILIES:
            raise ModelLoadError(
                f"{config_path}: architecture {architecture!r} is not supported; "
                f"loraserve runs {supported}"
            )
        return FAMILIES[architecture]
    model_type = config.get("model_type")
    if model_type not in FAMILY_OF_MODEL_TYPE:
        raise ModelLoadError(
            f"{config_path}: no `architectures` and model_type {model_type!r} is not supported; "
            f"loraserve runs {supported} (model_type {', '.join(FAMILY_OF_MODEL_TYPE)})"
        )
    return FAMILY_OF_MODEL_TYPE[model_type]


def _check_unsupported_features(config: dict[str, Any], family: Family, config_path: Path) -> None:
    """Refuse config options the forward pass does not implement."""
    activation = config.get(family.activation_key, family.default_activation)
    if activation not in ACTIVATIONS:
        raise ModelLoadError(
            f"{config_path}: {family.activation_key} {activation!r} is not supported; "
            f"loraserve runs {', '.join(ACTIVATIONS)}"
        )
    if config.get("mlp_bias"):
        raise ModelLoadError(
            f"{config_path}: mlp_bias=true is not supported (MLP without biases only)"
        )
    if family.gemma and config.get("use_bidirectional_attention"):
        raise ModelLoadError(
            f"{config_path}: use_bidirectional_attention (an embedding model) is not supported"
        )


def _layer_windows(
    config: dict[str, Any], family: Family, num_layers: int, config_path: Path
) -> tuple[int, ...]:
    """Each layer's sliding window, 0 for full attention; () when no layer slides.

    Which layers slide: `layer_types` where the family reads it, else the family's rule
    (Qwen: from `max_window_layers` on, with `use_sliding_window`; Gemma 2: every other;
    Gemma 3: all but every `sliding_window_pattern`-th; Mistral, Phi-3: all)."""
    window = config.get("sliding_window", family.default_sliding_window)
    if family.window_switch is not None and not config.get(family.window_switch, False):
        window = None  # Qwen2Config / Qwen3Config drop the window unless use_sliding_window
    if window is None:
        return ()
    window = _positive_int({"sliding_window": window}, "sliding_window", config_path)
    listed = config.get("layer_types") if family.reads_layer_types else None
    layer_types = listed or family.default_layer_types(config, num_layers)
    if len(layer_types) != num_layers or not set(layer_types) <= {SLIDING, FULL}:
        raise ModelLoadError(
            f"{config_path}: layer_types must list {num_layers} of {SLIDING!r} / {FULL!r}, got "
            f"{layer_types!r}"
        )
    if SLIDING not in layer_types:
        return ()
    return tuple(window if kind == SLIDING else 0 for kind in layer_types)


def _query_pre_attn_scalar(
    config: dict[str, Any], family: Family, config_path: Path
) -> float | None:
    """Gemma's attention scale is this ** -0.5; None for the other families (head_dim)."""
    if not family.gemma:
        return None
    value = config.get("query_pre_attn_scalar", GEMMA_QUERY_PRE_ATTN_SCALAR)
    return _positive_number(value, "query_pre_attn_scalar", config_path)


def _softcap(config: dict[str, Any], family: Family, key: str, config_path: Path) -> float | None:
    """A soft cap the family applies, or None (absent, null, or a key the family ignores)."""
    if key not in family.softcaps:
        return None
    value = config.get(key, family.softcaps[key])
    return None if value is None else _positive_number(value, key, config_path)


def _positive_number(value: Any, key: str, config_path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ModelLoadError(f"{config_path}: {key} must be a positive number, got {value!r}")
    return float(value)


def _special_token_ids(config: dict[str, Any], folder: Path) -> tuple[int | None, tuple[int, ...]]:
    """(bos id, eos ids): config.json's, completed by generation_config.json's.

    Instruct models often list their end-of-turn token only in generation_config.json,
    which is what generation stops on."""
    generation_path = folder / "generation_config.json"
    generation = read_json(generation_path) if generation_path.is_file() else {}
    bos = config.get("bos_token_id")
    if bos is None:
        bos = generation.get("bos_token_id")
    eos: list[int] = []
    for source in (config, generation):
        for token_id in _id_list(source.get("eos_token_id")):
            if token_id not in eos:
                eos.append(token_id)
    return (int(bos) if isinstance(bos, int) else None), tuple(eos)


def _id_list(value: Any) -> list[int]:
    """An `eos_token_id` value (int, list of ints or null) as a list."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int)]


def _optional_int(config: dict[str, Any], key: str, config_path: Path) -> int | None:
    """config[key] as a positive int, None when absent or null."""
    if config.get(key) is None:
        return None
    return _positive_int(config, key, config_path)


def _positive_int(config: dict[str, Any], key: str, config_path: Path) -> int:
    """config[key], which must be a positive int."""
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelLoadError(f"{config_path}: {key} must be a positive integer, got {value!r}")
    return value
