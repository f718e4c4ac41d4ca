"""Tiny models, tokenizers and PEFT adapters, built offline in a few seconds.

Every test that needs a model folder or an adapter folder makes it here, with
Hugging Face `transformers`, `tokenizers` and `peft` writing the files exactly as
they would for a real checkpoint.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

CORPUS = [
    "hello world, this is a tiny corpus for a tiny tokenizer.",
    "SELECT name FROM users WHERE id = 42;",
    "Bonjour le monde, comment allez-vous aujourd'hui ?",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "LoRA adapters share one base model and one page pool.",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
# Printable ASCII as byte-level BPE spells it (space, newline and tab are mapped to Ġ, Ċ, ĉ).
ASCII_ALPHABET = [chr(code) for code in range(33, 127)] + ["Ġ", "Ċ", "ĉ"]


def make_tokenizer(folder: Path, vocab_size: int = 320, all_bytes: bool = True) -> int:
    """Train a byte-level BPE on CORPUS, write tokenizer.json + tokenizer_config.json.

    `all_bytes` False: only printable ASCII, space, tab and newline are tokens, so that any
    sequence of tokens decodes to valid UTF-8 (a grammar over text can then admit any answer).
    Returns the tokenizer's vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if all_bytes else ASCII_ALPHABET,
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tokenizer.get_vocab_size()


# A random tiny Gemma with tied (sqrt(hidden)-scaled) embeddings repeats its last token
# whatever the prompt: untied, its greedy tokens vary (tied loading: tests/models).
UNTIED_GEMMA: dict[str, Any] = dict(tie_word_embeddings=False, initializer_range=0.3)
# Each new family as its real checkpoints configure it, at a tiny size: GQA, head_dim 16
# (Gemma: query_pre_attn_scalar apart from it), sliding windows of 12 tokens so that a
# prompt and its 32 new tokens run past them, soft caps low enough to bend the scores.
NEW_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3": (  # per-head q/k norms; sliding window in the layers from max_window_layers on
        "Qwen3Config",
        dict(use_sliding_window=True, sliding_window=12, max_window_layers=1),
    ),
    "gemma2": (  # alternating local (window 12) and global layers, both soft caps
        "Gemma2Config",
        dict(
            sliding_window=12,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=8.0,
            **UNTIED_GEMMA,
        ),
    ),
    "gemma3": (  # q/k norms, a local layer with its own RoPE base, then a global one
        "Gemma3TextConfig",
        dict(
            sliding_window=12,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=24,
            **UNTIED_GEMMA,
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
        ),
    ),
    "phi3": ("Phi3Config", dict(sliding_window=12)),  # fused qkv_proj / gate_up_proj
    "phi4-mini": (  # partial rotary 3/4, longrope (original length 128), tied embeddings
        "Phi3Config",
        dict(
            partial_rotary_factor=0.75,
            tie_word_embeddings=True,
            original_max_position_embeddings=128,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                "long_factor": [1.5, 2.0, 3.0, 4.5, 6.0, 8.0],
                "partial_rotary_factor": 0.75,
                "original_max_position_embeddings": 128,
            },
        ),
    ),
}


def tiny_config(kind: str, vocab_size: int, **overrides: Any):
    """A transformers config for a tiny model of one family.

    kind: `llama` (MHA), `llama-gqa`, `llama3` (GQA + llama3 rope scaling),
    `mistral`, `qwen2` (q/k/v bias, tied embeddings), or one of NEW_FAMILIES."""
    import transformers
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        initializer_range=0.2,  # wide logits: greedy choices far from ties
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    if kind == "llama":
        config = LlamaConfig(**{**common, **overrides})
    elif kind == "llama-gqa":
        config = LlamaConfig(**{**common, "num_key_value_heads": 2, **overrides})
    elif kind == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        config = LlamaConfig(
            **{**common, "num_key_value_heads": 2, "rope_parameters": rope, **overrides}
        )
    elif kind == "mistral":
        config = MistralConfig(
            **{**common, "num_key_value_heads": 2, "sliding_window": 4096, **overrides}
        )
    elif kind == "qwen2":
        config = Qwen2Config(
            **{**common, "num_key_value_heads": 2, "tie_word_embeddings": True, **overrides}
        )
    elif kind in NEW_FAMILIES:
        class_name, family = NEW_FAMILIES[kind]
        gqa = {"num_key_value_heads": 2, "head_dim": 16, "pad_token_id": 1}
        if class_name == "Phi3Config":
            del gqa["head_dim"]  # Phi3Config derives it (64 / 4 = 16)
        config_class = getattr(transformers, class_name)
        config = config_class(**{**common, **gqa, **family, **overrides})
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    return config


def make_model(
    folder: Path,
    kind: str = "llama",
    seed: int = 0,
    max_shard_size: str | None = None,
    all_bytes: bool = True,
    **overrides: Any,
):
    """Write a random tiny model + tokenizer to `folder`; returns the HF model (float32, eval)."""
    from transformers import AutoModelForCausalLM

    vocab_size = make_tokenizer(folder, all_bytes=all_bytes)
    config = tiny_config(kind, vocab_size, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    with torch.no_grad():  # norms start at 1 (or Gemma's 0): make each weight count
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return model


def make_adapter(base_model, folder: Path, seed: int = 0, **lora_config: Any) -> Path:
    """Write a PEFT LoRA adapter for `base_model` with random (non-zero) A and B.

    `lora_config` goes to `peft.LoraConfig` (r, lora_alpha, target_modules,
    use_rslora, rank_pattern, alpha_pattern, use_dora, ...). A DoRA adapter's magnitude m,
    which PEFT starts at ||W + sBA|| (g = 1: plain LoRA's output), is scaled by random
    factors in [0.5, 1.5] per output feature, as training moves it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **lora_config)
    peft_model = get_peft_model(copy.deepcopy(base_model), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # scale up so adapters visibly change greedy outputs
                param.mul_(4.0)
            if "lora_magnitude_vector" in name:
                param.mul_(torch.rand(param.shape) + 0.5)
    peft_model.save_pretrained(folder)
    return folder


def make_overflowing_adapter(base_model, folder: Path, seed: int = 0) -> Path:
    """A finite adapter whose output overflows float32 (a broken fine-tune): lora_B of
    ~1e30 on q_proj and k_proj makes the attention scores infinite, so the logits of any
    request using it are NaN. loraserve refuses it unless `max_adapter_weight` allows 1e30."""
    from safetensors.torch import load_file, save_file

    make_adapter(base_model, folder, seed=seed, r=4, target_modules=["q_proj", "k_proj"])
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    for name, tensor in tensors.items():
        if "lora_B" in name:
            tensors[name] = torch.full_like(tensor, 1e30)
    save_file(tensors, path)
    return folder


def peft_model_for(base_model, adapter_folder: Path):
    """The PEFT reference: `base_model` with one adapter loaded, float32, eval."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base_model), str(adapter_folder)).eval()


def greedy_reference(model, prompt_ids: list[int], max_new_tokens: int):
    """Greedy tokens and per-step logits of an HF/PEFT model for one prompt.

    A plain loop over full forward passes: no EOS handling (like `ignore_eos`), no
    logits processors, no cache, so what it returns is the model's own argmax."""
    ids = list(prompt_ids)
    step_logits = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()  # [vocab]
            step_logits.append(logits)
            ids.append(int(logits.argmax()))
    return ids[len(prompt_ids) :], torch.stack(step_logits)  # [new_tokens], [new_tokens, vocab]
