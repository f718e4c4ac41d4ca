"""The JSON files of a Llama model folder and of a PEFT LoRA folder, as Hugging Face writes them.

The mirror of models/config.py and memory/peft_format.py, for the places that write
folders themselves (the demo's model converted from GGUF and its adapters, the tests'
toy model, the benchmarks' random-weight models): one writer, so all produce what
`save_pretrained` would and what both loraserve and transformers/peft read (the tests
load them with both).
"""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def llama_config(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    max_position_embeddings: int,
    rope_theta: float,
    rms_norm_eps: float,
    bos_token_id: int,
    eos_token_id: int,
    dtype: str,
    tie_word_embeddings: bool = False,
) -> dict:
    """config.json of a LlamaForCausalLM, in both the transformers 5 and the older keys."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "rope_theta": rope_theta,  # the key transformers < 5 reads
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": tie_word_embeddings,
        "initializer_range": 0.02,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
        "dtype": dtype,
        "torch_dtype": dtype,  # the key transformers < 5 reads
        "use_cache": True,
    }


def generation_config(bos_token_id: int, eos_token_id: int) -> dict:
    """generation_config.json: where loraserve also looks for EOS ids."""
    return {
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
    }


def lora_adapter_config(rank: int, lora_alpha: int, target_modules: list[str]) -> dict:
    """adapter_config.json of a plain LoRA (no DoRA, no bias, no patterns)."""
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
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }
