"""The RoPE settings of a config.json, in every form transformers writes them.

transformers 5 writes `rope_parameters` (Gemma 3: one per layer type, `full_attention`
and `sliding_attention`); older folders `rope_theta` + `rope_scaling` (Gemma 3 adds
`rope_local_base_freq`; Phi-3 spells longrope `su` and keeps
`original_max_position_embeddings` and `partial_rotary_factor` at the top level).
Anything models/rope.py does not compute is refused with a `ModelLoadError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraserve.errors import ModelLoadError
from loraserve.models.arch import SUPPORTED_ROPE_TYPES
from loraserve.models.families import Family

# Keys each rope type needs in its scaling dict (transformers' validators).
ROPE_REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
}
ROPE_ALIASES = {"su": "longrope"}  # Phi-3's first name for it
GEMMA3_LOCAL_THETA = 10_000.0  # Gemma3TextConfig's default `rope_local_base_freq`


@dataclass(frozen=True)
class RopeSettings:
    """What models/rope.py needs: see the ModelArch fields of the same names."""

    rope_theta: float
    rope_scaling: dict[str, Any] | None
    local_rope_theta: float | None
    partial_rotary_factor: float


def read_rope(
    config: dict[str, Any], family: Family, head_dim: int, config_path: Path
) -> RopeSettings:
    """The RoPE settings of `config`; ModelLoadError for what loraserve does not compute."""
    if family.local_rope:
        global_rope, local_rope = _by_layer_type(config, family)
    else:
        global_rope, local_rope = rope_dict(config), None
    theta, scaling = normalize_rope(global_rope, config, family, config_path)
    local_theta = None
    if local_rope is not None:
        local_theta, local_scaling = normalize_rope(local_rope, config, family, config_path)
        if local_scaling is not None:
            raise ModelLoadError(
                f"{config_path}: rope scaling of the sliding-window layers is not supported"
            )
    partial = _partial_rotary_factor(config, global_rope, family, config_path)
    if scaling is not None and scaling["rope_type"] == "longrope":
        _check_longrope_factors(scaling, int(head_dim * partial), config_path)
    return RopeSettings(theta, scaling, local_theta, partial)


def rope_dict(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of `rope_parameters` (transformers 5) or `rope_scaling` (older), or {}."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return dict(rope) if isinstance(rope, dict) else {}


def _by_layer_type(config: dict[str, Any], family: Family) -> tuple[dict[str, Any], dict[str, Any]]:
    """Gemma 3's (global, local) rope dicts, each with its `rope_theta`."""
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and ("full_attention" in rope or "sliding_attention" in rope):
        global_rope = dict(rope.get("full_attention") or {})
        local_rope = dict(rope.get("sliding_attention") or {})
    else:  # the old form: rope_scaling applies to the global layers only
        global_rope = dict(config.get("rope_scaling") or {})
        local_rope = {"rope_theta": config.get("rope_local_base_freq", GEMMA3_LOCAL_THETA)}
    global_rope.setdefault("rope_theta", config.get("rope_theta", family.default_rope_theta))
    local_rope.setdefault("rope_theta", GEMMA3_LOCAL_THETA)
    return global_rope, local_rope


def normalize_rope(
    rope: dict[str, Any], config: dict[str, Any], family: Family, config_path: Path
) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) of one rope dict; rope_scaling is None for default rope.

    As transformers' `standardize_rope_params`: `type` is the old name of `rope_type`,
    and llama3 and longrope fall back to the config's top-level original length."""
    theta = float(rope.get("rope_theta") or config.get("rope_theta") or family.default_rope_theta)
    kind = rope.get("rope_type") or rope.get("type") or "default"
    kind = ROPE_ALIASES.get(kind, kind)
    if family.fused_projections and kind == "yarn":
        kind = "longrope"  # Phi3Config reads a `yarn` type as longrope
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
    if kind in ("llama3", "longrope"):
        original = config.get("original_max_position_embeddings")
        if kind == "llama3":
            original = original or config.get("max_position_embeddings")
        scaling.setdefault("original_max_position_embeddings", original)
    missing = [key for key in ROPE_REQUIRED_KEYS[kind] if scaling.get(key) is None]
    if missing:
        raise ModelLoadError(f"{config_path}: rope type {kind!r} needs {', '.join(missing)}")
    return theta, scaling


def _partial_rotary_factor(
    config: dict[str, Any], rope: dict[str, Any], family: Family, config_path: Path
) -> float:
    """The fraction of each head RoPE rotates: 1, unless the family reads another."""
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    if partial in (None, 1, 1.0):
        return 1.0
    if not family.partial_rotary:
        raise ModelLoadError(
            f"{config_path}: partial_rotary_factor={partial} is not supported for "
            f"{family.architecture} (full rotary only)"
        )
    if isinstance(partial, bool) or not isinstance(partial, int | float) or not 0 < partial < 1:
        raise ModelLoadError(
            f"{config_path}: partial_rotary_factor must be in (0, 1], got {partial!r}"
        )
    return float(partial)


def _check_longrope_factors(scaling: dict[str, Any], rotary_dim: int, config_path: Path) -> None:
    for key in ("short_factor", "long_factor"):
        factors = scaling[key]
        if not isinstance(factors, list) or len(factors) != rotary_dim // 2:
            raise ModelLoadError(
                f"{config_path}: longrope's {key} must be a list of rotary_dim / 2 = "
                f"{rotary_dim // 2} numbers"
            )
