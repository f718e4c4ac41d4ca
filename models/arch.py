"""The shape of a Llama-family model, read once from its Hugging Face `config.json`.

`ModelArch` is what every part of loraserve needs to know about the base model:
the pool sizes its pages from it, the adapter store checks adapter shapes against
it, the forward pass is built from it. It is parsed by `models.config.load_arch`.
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
"""The groups in layer order; `LoraBatch.tables[layer][i]` is group i's."""
QKV, O_PROJ, GATE_UP, DOWN = range(len(LORA_GROUPS))

SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3", "dynamic")
"""`rope_type`s models/rope.py implements."""


@dataclass(frozen=True)
class ModelArch:
    """Architecture of the base model (from config.json; never edited by the user)."""

    architecture: str
    """`LlamaForCausalLM`, `MistralForCausalLM` or `Qwen2ForCausalLM`."""
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
    sliding_window: int | None = None
    torch_dtype: str = "float32"
    """The dtype the checkpoint was saved in (`dtype` or `torch_dtype`)."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_dims(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of one targetable linear layer."""
        hidden, inter = self.hidden_size, self.intermediate_size
        dims = {
            "q_proj": (hidden, self.q_size),
            "k_proj": (hidden, self.kv_size),
            "v_proj": (hidden, self.kv_size),
            "o_proj": (self.q_size, hidden),
            "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        }
        return dims[module]

    def max_module_dim(self) -> int:
        """The longest row of any LoRA matrix (A is [r, in], B is stored as [r, out])."""
        return max(max(self.module_dims(m)) for m in LORA_MODULES)
