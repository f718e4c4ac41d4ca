"""Read a local Hugging Face model folder's `config.json` into a `ModelArch`.

Both config forms are read: transformers 5 writes `rope_parameters` and `dtype`,
older folders `rope_theta` + `rope_scaling` and `torch_dtype`. Anything loraserve
would run differently from transformers (another architecture, activation, rope
type, per-layer sliding windows, MLP biases) is refused here with a
`ModelLoadError`, before a single weight is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loraserve.errors import ModelLoadError
from loraserve.models.arch import SUPPORTED_ROPE_TYPES, ModelArch

# architecture -> model_type; model_type -> architecture when `architectures` is absent.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
ARCHITECTURE_OF_MODEL_TYPE = {kind: arch for arch, kind in SUPPORTED_ARCHITECTURES.items()}

# Keys each rope type needs in its scaling dict (transformers' validators).
ROPE_REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
DEFAULT_ROPE_THETA = 10_000.0  # transformers' `default_theta`
DEFAULT_SLIDING_WINDOW = 4096  # MistralConfig / Qwen2Config default when the key is absent
DEFAULT_MAX_WINDOW_LAYERS = 28  # Qwen2Config default


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
    architecture, model_type = _architecture(config, config_path)
    _check_unsupported_features(config, config_path)
    num_heads = _positive_int(config, "num_attention_heads", config_path)
    num_kv_heads = _optional_int(config, "num_key_value_heads", config_path) or num_heads
    if num_heads % num_kv_heads:
        raise ModelLoadError(
            f"{config_path}: num_attention_heads={num_heads} is not a multiple of "
            f"num_key_value_heads={num_kv_heads}"
        )
    hidden_size = _positive_int(config, "hidden_size", config_path)
    rope_theta, rope_scaling = normalize_rope(config, config_path)
    bos_token_id, eos_token_ids = _special_token_ids(config, path)
    # Only Llama reads `attention_bias` (q/k/v/o alike); Qwen2 always has q/k/v biases, Mistral none.
    llama_bias = model_type == "llama" and bool(config.get("attention_bias", False))
    return ModelArch(
        architecture=architecture,
        model_type=model_type,
        hidden_size=hidden_size,
        intermediate_size=_positive_int(config, "intermediate_size", config_path),
        num_layers=_positive_int(config, "num_hidden_layers", config_path),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=_optional_int(config, "head_dim", config_path) or hidden_size // num_heads,
        vocab_size=_positive_int(config, "vocab_size", config_path),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        max_position_embeddings=_positive_int(config, "max_position_embeddings", config_path),
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2" or llama_bias,
        o_proj_bias=llama_bias,
        sliding_window=_sliding_window(config, model_type, config_path),
        torch_dtype=str(config.get("dtype") or config.get("torch_dtype") or "float32"),
        bos_token_id=bos_token_id,
        eos_token_ids=eos_token_ids,
    )


def _architecture(config: dict[str, Any], config_path: Path) -> tuple[str, str]:
    """(architecture, model_type), from `architectures` or else from `model_type`."""
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    architectures = config.get("architectures")
    if architectures:
        architecture = architectures[0] if isinstance(architectures, list) else architectures
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"{config_path}: architecture {architecture!r} is not supported; "
                f"loraserve runs {supported}"
            )
        return architecture, SUPPORTED_ARCHITECTURES[architecture]
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURE_OF_MODEL_TYPE:
        raise ModelLoadError(
            f"{config_path}: no `architectures` and model_type {model_type!r} is not supported; "
            f"loraserve runs {supported} (model_type {', '.join(ARCHITECTURE_OF_MODEL_TYPE)})"
        )
    return ARCHITECTURE_OF_MODEL_TYPE[model_type], model_type


def _check_unsupported_features(config: dict[str, Any], config_path: Path) -> None:
    """Refuse config options the Llama-family forward pass does not implement."""
    hidden_act = config.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ModelLoadError(
            f"{config_path}: hidden_act {hidden_act!r} is not supported; loraserve runs only silu (SwiGLU)"
        )
    if config.get("mlp_bias"):
        raise ModelLoadError(
            f"{config_path}: mlp_bias=true is not supported (MLP without biases only)"
        )
    partial = _rope_dict(config).get("partial_rotary_factor", config.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ModelLoadError(
            f"{config_path}: partial_rotary_factor={partial} is not supported (full rotary only)"
        )


def _rope_dict(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of `rope_parameters` (transformers 5) or `rope_scaling` (older), or {}."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return dict(rope) if isinstance(rope, dict) else {}


def normalize_rope(
    config: dict[str, Any], config_path: Path
) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either config form; rope_scaling is None for default rope.

    As transformers' `standardize_rope_params`: `type` is the old name of `rope_type`,
    and llama3 falls back to `max_position_embeddings` for its original length."""
    rope = _rope_dict(config)
    theta = float(rope.get("rope_theta") or config.get("rope_theta") or DEFAULT_ROPE_THETA)
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"{config_path}: rope type {kind!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if kind == "default":
        return theta, None
    scaling = {
        k: v for k, v in rope.items() if k not in ("rope_theta", "type", "partial_rotary_factor")
    }
    scaling["rope_type"] = kind
    if kind == "llama3":
        original = config.get("original_max_position_embeddings") or config.get(
            "max_position_embeddings"
        )
        scaling.setdefault("original_max_position_embeddings", original)
    missing = [key for key in ROPE_REQUIRED_KEYS[kind] if scaling.get(key) is None]
    if missing:
        raise ModelLoadError(f"{config_path}: rope type {kind!r} needs {', '.join(missing)}")
    return theta, scaling


def _sliding_window(config: dict[str, Any], model_type: str, config_path: Path) -> int | None:
    """The attention window of every layer, or None for full attention.

    Qwen2 slides only when `use_sliding_window`, and then only in layers from
    `max_window_layers` on; a model mixing both kinds of layer is refused, since
    ModelArch has one window for all layers."""
    if model_type == "llama":
        return None
    window = config.get("sliding_window", DEFAULT_SLIDING_WINDOW)
    if model_type == "mistral" or window is None:
        return window
    if not config.get("use_sliding_window", False):
        return None
    num_layers = _positive_int(config, "num_hidden_layers", config_path)
    layer_types = config.get("layer_types") or [
        "sliding_attention"
        if i >= config.get("max_window_layers", DEFAULT_MAX_WINDOW_LAYERS)
        else "full_attention"
        for i in range(num_layers)
    ]
    if all(kind == "full_attention" for kind in layer_types):
        return None
    if all(kind == "sliding_attention" for kind in layer_types):
        return int(window)
    raise ModelLoadError(
        f"{config_path}: sliding window attention in some layers only (layer_types / "
        "max_window_layers) is not supported"
    )


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
