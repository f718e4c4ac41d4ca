"""The shape of a decoder-only model, read once from its Hugging Face `config.json`.

`ModelArch` is what every part of loraserve needs to know about the base model:
the pool sizes its pages from it, the adapter store checks adapter shapes against
it, the forward pass is built from it. It is parsed by `models.hf_config.load_arch`;
which families exist and what each switches on is `models.families`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The linear layers a LoRA adapter may target, in the order used by every table
# (offset tables, rank tables, host adapter layout). Index = module id.
LORA_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
NUM_LORA_MODULES = len(LORA_MODULES)
MODULE_INDEX: dict[str, int] = {name: index for index, name in enumerate(LORA_MODULES)}

# Module groups that share one input and run as one fused base matmul; LoRA
# handles each group as slices of one shrink/expand launch.
QKV_GROUP = (0, 1, 2)
O_GROUP = (3,)
GATE_UP_GROUP = (4, 5)
DOWN_GROUP = (6,)
LORA_GROUPS = (QKV_GROUP, O_GROUP, GATE_UP_GROUP, DOWN_GROUP)
"""The groups in layer order; `models.batch.lora_tables(...)[layer][i]` is group i's."""
QKV, O_PROJ, GATE_UP, DOWN = range(len(LORA_GROUPS))

FUSED_MODULES: dict[str, tuple[int, ...]] = {"qkv_proj": QKV_GROUP, "gate_up_proj": GATE_UP_GROUP}
"""Checkpoints that store q/k/v and gate/up as one linear each (Phi-3): the fused module's
name -> the LORA_MODULES its output rows are, in order. An adapter on a fused module has one
A and one B over the fused output; it fills those modules' slices with that one A."""
FUSED_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
ATTENTION_LINEARS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"})


def linear_parent(module: str) -> str:
    """The submodule of a decoder layer that holds linear layer `module` (self_attn or mlp)."""
    return "self_attn" if module in ATTENTION_LINEARS else "mlp"


SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3", "dynamic", "longrope")
"""`rope_type`s models/rope.py implements."""


@dataclass(frozen=True)
class ModelArch:
    """Architecture of the base model (from config.json; never edited by the user)."""

    architecture: str
    """One of `models.families.FAMILIES`, e.g. `LlamaForCausalLM`, `Gemma2ForCausalLM`."""
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict[str, Any] | None = None
    """None, or the rope scaling dict (`rope_type` in linear | llama3 | dynamic ...)."""
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    """True when q/k/v projections carry a bias (Qwen2; Llama with `attention_bias`)."""
    o_proj_bias: bool = False
    """True when o_proj carries a bias too (Llama with `attention_bias`; never Qwen2)."""
    layer_windows: tuple[int, ...] = ()
    """Per layer, its sliding window (a query sees its last `window` keys, itself included),
    0 for full attention; empty means every layer is full."""
    torch_dtype: str = "float32"
    """The dtype the checkpoint was saved in (`dtype` or `torch_dtype`)."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    hidden_act: str = "silu"
    """The MLP's gate activation, one of kernels.constants.ACTIVATIONS."""
    fused_projections: bool = False
    """The checkpoint holds q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj` (Phi-3)."""
    qk_norm: bool = False
    """Per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3)."""
    gemma_norms: bool = False
    """Gemma 2 / 3: RMSNorms scale by (1 + weight) in float32; the attention and MLP outputs
    are normed too (post-attention, pre- and post-feed-forward norms); embeddings are
    multiplied by sqrt(hidden_size)."""
    query_pre_attn_scalar: float | None = None
    """Attention scores are scaled by this ** -0.5 instead of head_dim ** -0.5 (Gemma)."""
    attn_logit_softcapping: float | None = None
    """Attention scores become cap * tanh(score / cap) (Gemma 2); None: no capping."""
    final_logit_softcapping: float | None = None
    """Logits become cap * tanh(logit / cap) (Gemma 2 and 3); None: no capping."""
    local_rope_theta: float | None = None
    """RoPE base of the sliding-window layers (Gemma 3, default rope); None: every layer
    rotates with rope_theta and rope_scaling."""
    partial_rotary_factor: float = 1.0
    """The fraction of each head's dimensions RoPE rotates (the first ones; Phi-4-mini: 0.75)."""

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attention_scale(self) -> float:
        """What q @ k is multiplied by before the softmax."""
        if self.query_pre_attn_scalar is not None:
            return float(self.query_pre_attn_scalar) ** -0.5
        return float(self.head_dim) ** -0.5

    @property
    def rotary_dim(self) -> int:
        """The leading dimensions of each head that RoPE rotates (transformers' int())."""
        return int(self.head_dim * self.partial_rotary_factor)

    def layer_window(self, layer: int) -> int:
        """Layer `layer`'s sliding window, 0 for full attention."""
        return self.layer_windows[layer] if self.layer_windows else 0

    @property
    def layer_norms(self) -> tuple[str, ...]:
        """The hidden-size norms of a decoder layer (Gemma's four: two more around the MLP)."""
        names = ("input_layernorm", "post_attention_layernorm")
        if not self.gemma_norms:
            return names
        return (*names, "pre_feedforward_layernorm", "post_feedforward_layernorm")

    @property
    def linear_modules(self) -> tuple[str, ...]:
        """The names of each decoder layer's linear layers, as the checkpoint and PEFT see them."""
        return FUSED_LINEARS if self.fused_projections else LORA_MODULES

    def module_dims(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of one linear layer (fused ones included)."""
        hidden, inter = self.hidden_size, self.intermediate_size
        dims = {
            "q_proj": (hidden, self.q_size),
            "k_proj": (hidden, self.kv_size),
            "v_proj": (hidden, self.kv_size),
            "o_proj": (self.q_size, hidden),
            "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
            "qkv_proj": (hidden, self.q_size + 2 * self.kv_size),
            "gate_up_proj": (hidden, 2 * inter),
        }
        return dims[module]

    def has_bias(self, module: str) -> bool:
        """Whether the checkpoint holds a bias for linear layer `module`."""
        if module == "o_proj":
            return self.o_proj_bias
        return module in ATTENTION_LINEARS and self.attention_bias

    def max_module_dim(self) -> int:
        """The longest row of any LoRA matrix (A is [r, in], B is stored as [r, out])."""
        return max(max(self.module_dims(m)) for m in LORA_MODULES)
