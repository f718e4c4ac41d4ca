"""The JSON files of a Llama model folder and of a PEFT LoRA folder, as Hugging Face writes them.

The mirror of models/hf_config.py and memory/peft_format.py, for the places that write
folders themselves (the demo's model converted from GGUF and its adapters, the tests'
toy model, the benchmarks' random-weight models): one writer, so all produce what
`save_pretrained` would and what both loraserve and transformers/peft read (the tests
load them with both). A model is described by its `ModelArch` (`llama_arch` makes one),
and `load_arch` reads back the very same ModelArch from what is written here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from loraserve.models.arch import ModelArch

if TYPE_CHECKING:
    import torch

MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
"""What `write_model` writes: the weights in one file (sharding is the loader's business,
tested elsewhere)."""
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
"""What `write_adapter` writes."""


class SavableTokenizer(Protocol):
    """A `tokenizers.Tokenizer` (what tokenizer.json holds)."""

    def save(self, path: str) -> None: ...


def write_model(
    folder: Path,
    arch: ModelArch,
    weights: Mapping[str, torch.Tensor],
    tokenizer: SavableTokenizer,
    tokenizer_config: dict,
) -> None:
    """MODEL_FILES of a plain Llama into `folder` (made if missing): `weights` under
    transformers' names, `tokenizer_config` the special tokens (and chat template)."""
    from safetensors.torch import save_file  # here: the front end imports this module

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().contiguous() for name, tensor in weights.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_json(folder / "config.json", llama_config(arch))
    write_json(folder / "generation_config.json", generation_config(arch))
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer_config}
    write_json(folder / "tokenizer_config.json", tokenizer_config)


def write_adapter(
    folder: Path,
    weights: Mapping[str, torch.Tensor],
    rank: int,
    lora_alpha: int,
    target_modules: list[str],
    use_dora: bool = False,
) -> None:
    """ADAPTER_FILES of a LoRA into `folder` (made if missing): `weights` under PEFT's
    names (`base_model.model.<module>.lora_A.weight` [r, in], `lora_B.weight` [out, r]; with
    `use_dora`, `<module>.lora_magnitude_vector` [out] too)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().contiguous() for name, tensor in weights.items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    write_json(
        folder / "adapter_config.json",
        lora_adapter_config(rank, lora_alpha, target_modules, use_dora),
    )


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def llama_arch(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    max_position_embeddings: int,
    bos_token_id: int,
    eos_token_id: int,
    head_dim: int | None = None,
    rope_theta: float = 10000.0,
    rms_norm_eps: float = 1e-5,
    torch_dtype: str = "float32",
    tie_word_embeddings: bool = False,
) -> ModelArch:
    """The ModelArch of a plain Llama (default RoPE, no biases, SwiGLU; head_dim by default
    hidden_size / num_heads): what `load_arch` reads back from `llama_config`'s file."""
    return ModelArch(
        architecture="LlamaForCausalLM",
        model_type="llama",
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim or hidden_size // num_heads,
        vocab_size=vocab_size,
        rms_norm_eps=rms_norm_eps,
        rope_theta=rope_theta,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        torch_dtype=torch_dtype,
        bos_token_id=bos_token_id,
        eos_token_ids=(eos_token_id,),
    )


_LLAMA_ARCH_ARGUMENTS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "max_position_embeddings",
    "head_dim",
    "rope_theta",
    "rms_norm_eps",
    "torch_dtype",
    "tie_word_embeddings",
)
"""The arguments of `llama_arch` that are ModelArch fields of the same name."""


def llama_config(arch: ModelArch) -> dict:
    """config.json of a LlamaForCausalLM of `arch`, in both the transformers 5 and the
    older keys. Only what `llama_arch` can make is written: a plain Llama."""
    sizes = {name: getattr(arch, name) for name in _LLAMA_ARCH_ARGUMENTS}
    plain = llama_arch(**sizes, bos_token_id=_bos(arch), eos_token_id=_eos(arch))
    if arch != plain:
        raise ValueError(f"llama_config writes plain Llama models only, got {arch}")
    return {
        "architectures": [arch.architecture],
        "model_type": arch.model_type,
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "hidden_act": arch.hidden_act,
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": arch.rope_theta},
        "rope_theta": arch.rope_theta,  # the key transformers < 5 reads
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "initializer_range": 0.02,
        "bos_token_id": _bos(arch),
        "eos_token_id": _eos(arch),
        "pad_token_id": _eos(arch),
        "dtype": arch.torch_dtype,
        "torch_dtype": arch.torch_dtype,  # the key transformers < 5 reads
        "use_cache": True,
    }


def generation_config(arch: ModelArch) -> dict:
    """generation_config.json: where loraserve also looks for EOS ids."""
    return {"bos_token_id": _bos(arch), "eos_token_id": _eos(arch), "pad_token_id": _eos(arch)}


def _bos(arch: ModelArch) -> int:
    if arch.bos_token_id is None:
        raise ValueError("a written model needs a bos_token_id, got None")
    return arch.bos_token_id


def _eos(arch: ModelArch) -> int:
    if len(arch.eos_token_ids) != 1:
        raise ValueError(f"a written model has one eos token id, got {arch.eos_token_ids}")
    return arch.eos_token_ids[0]


def lora_adapter_config(
    rank: int, lora_alpha: int, target_modules: list[str], use_dora: bool = False
) -> dict:
    """adapter_config.json of a LoRA (DoRA with `use_dora`; no bias, no patterns)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": rank,
        "lora_alpha": lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": target_modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": use_dora,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }
