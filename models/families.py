"""The model families loraserve runs, and what each one's forward does beyond Llama's.

One record per architecture. `models/config.py` reads a config.json through it (which
keys exist, what their defaults are); `ModelArch` then carries the values, and the one
forward pass (`models/llama.py`), the checkpoint reader (`models/weights.py`) and the
adapter reader (`memory/peft_format.py`) switch their pieces on from the arch alone.
Each record follows the family's transformers modeling and configuration files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SLIDING, FULL = "sliding_attention", "full_attention"  # transformers' layer_types values
LayerTypes = Callable[[dict[str, Any], int], list[str]]


def _all_full(config: dict[str, Any], num_layers: int) -> list[str]:
    return [FULL] * num_layers


def _all_sliding(config: dict[str, Any], num_layers: int) -> list[str]:
    """Mistral, Phi-3: every layer slides (when the model has a window at all)."""
    return [SLIDING] * num_layers


def _qwen(config: dict[str, Any], num_layers: int) -> list[str]:
    """Qwen2 / Qwen3: the layers from `max_window_layers` on."""
    first = config.get("max_window_layers", 28)
    return [SLIDING if i >= first else FULL for i in range(num_layers)]


def _gemma2(config: dict[str, Any], num_layers: int) -> list[str]:
    """Gemma 2: local and global layers alternate, the first one local."""
    return [SLIDING if (i + 1) % 2 else FULL for i in range(num_layers)]


def _gemma3(config: dict[str, Any], num_layers: int) -> list[str]:
    """Gemma 3: one global layer every `sliding_window_pattern` (6) layers."""
    pattern = config.get("sliding_window_pattern", 6)
    return [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]


@dataclass(frozen=True)
class Family:
    """How one architecture's config.json reads and which pieces its forward switches on."""

    architecture: str
    model_type: str
    default_layer_types: LayerTypes = _all_full
    """Which layers slide when config.json has no `layer_types` (or the family ignores it)."""
    reads_layer_types: bool = False
    """Whether the family's transformers config honours a `layer_types` list."""
    default_sliding_window: int | None = None
    """The window when config.json has no `sliding_window` key (4096 where transformers has one)."""
    window_switch: str | None = None
    """A config key that must be true for the window to apply (Qwen's `use_sliding_window`)."""
    biases: str = "none"
    """`none`; `qkv` (q/k/v always carry a bias: Qwen2); `attention_bias` (q/k/v and o carry
    one when config.json's `attention_bias` is true)."""
    activation_key: str = "hidden_act"
    """The config key of the MLP activation (Gemma: `hidden_activation`)."""
    default_activation: str = "silu"
    qk_norm: bool = False
    gemma: bool = False
    """Gemma 2 / 3: (1 + weight) norms, sandwich norms, scaled embeddings, query_pre_attn_scalar."""
    softcaps: dict[str, float | None] = field(default_factory=dict)
    """The soft-capping keys the family reads, with transformers' defaults (Gemma 2: attention
    50 and logits 30; Gemma 3: logits only, none by default: its attention ignores the key)."""
    local_rope: bool = False
    """Sliding layers rotate with their own base (Gemma 3's `rope_local_base_freq`)."""
    fused_projections: bool = False
    """qkv_proj and gate_up_proj in the checkpoint (Phi-3)."""
    partial_rotary: bool = False
    """Reads `partial_rotary_factor` (Phi-3's RoPE rotates only that fraction of a head)."""
    default_rope_theta: float = 10_000.0


# What Qwen2 / Qwen3 and Gemma 2 / Gemma 3 share.
_QWEN: dict[str, Any] = dict(
    default_layer_types=_qwen,
    reads_layer_types=True,
    default_sliding_window=4096,
    window_switch="use_sliding_window",
)
_GEMMA: dict[str, Any] = dict(
    reads_layer_types=True,
    default_sliding_window=4096,
    biases="attention_bias",
    activation_key="hidden_activation",
    default_activation="gelu_pytorch_tanh",
    gemma=True,
)
FAMILIES: dict[str, Family] = {
    family.architecture: family
    for family in (
        Family("LlamaForCausalLM", "llama", biases="attention_bias"),
        Family("MistralForCausalLM", "mistral", _all_sliding, default_sliding_window=4096),
        Family("Qwen2ForCausalLM", "qwen2", biases="qkv", **_QWEN),
        Family("Qwen3ForCausalLM", "qwen3", biases="attention_bias", qk_norm=True, **_QWEN),
        Family(
            "Gemma2ForCausalLM",
            "gemma2",
            _gemma2,
            softcaps={"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
            **_GEMMA,
        ),
        Family(
            "Gemma3ForCausalLM",
            "gemma3_text",
            _gemma3,
            qk_norm=True,
            softcaps={"final_logit_softcapping": None},
            local_rope=True,
            default_rope_theta=1_000_000.0,
            **_GEMMA,
        ),
        Family(
            "Phi3ForCausalLM", "phi3", _all_sliding, fused_projections=True, partial_rotary=True
        ),
    )
}
"""Every supported architecture, by its `architectures` name in config.json."""
FAMILY_OF_MODEL_TYPE = {family.model_type: family for family in FAMILIES.values()}
