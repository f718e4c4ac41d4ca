"""Random-weight models and PEFT adapters of real shapes, for benchmarks: no download.

A benchmark needs the *shapes* of Llama-2-7B or Llama-3-8B (what the kernels and the
memory traffic depend on), not their knowledge, so the weights are random (normal, std
0.02, as transformers initialises them; norms at 1). A shape is the `ModelArch`
loraserve reads back from the folder. The files are those `transformers`' and `peft`'s
`save_pretrained` write, written by models/hf_files.py with torch and safetensors
directly: initialising a 7B model through transformers on a CPU takes minutes, a
`torch.randn` on the GPU takes a second.

    python -m bench.models --shape cpu --output /tmp/bench-model
    python -m bench.models --shape llama-2-7b --dtype bfloat16 --device cuda --output /data/l2

The folder gets hf_files.MODEL_FILES; its tokenizer.json is a word-level vocabulary of
the model's size (benchmarks send token ids, text is never compared): the 256 characters
of GPT-2's byte-level alphabet, then words `w259 w260 ...`, decoded byte-level, so that
structured output (llguidance reads the decoder to know each token's bytes) can spell any
string with it.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel

from loraserve.models.arch import ModelArch, linear_parent
from loraserve.models.hf_files import llama_arch, write_adapter, write_model

BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
INIT_STD = 0.02


SHAPES: dict[str, ModelArch] = {
    name: llama_arch(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        max_position_embeddings=context,
        rope_theta=rope_theta,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    for name, (vocab, hidden, intermediate, layers, heads, kv_heads, context, rope_theta) in {
        # The CPU benchmark model: at least hidden 256 and 4 layers (issue 5), MHA.
        "cpu": (1000, 256, 688, 4, 4, 4, 1024, 10000.0),
        "llama-2-7b": (32000, 4096, 11008, 32, 32, 32, 4096, 10000.0),
        "llama-3-8b": (128256, 4096, 14336, 32, 32, 8, 8192, 500000.0),
    }.items()
}
"""The shapes a benchmark can build, by name (`--shape`, a preset's `model`)."""


def build_model(
    folder: Path,
    arch: ModelArch,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> Path:
    """Write a random-weight LlamaForCausalLM folder of `arch` to `folder`."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def normal(*size: int) -> torch.Tensor:
        weight = torch.randn(*size, generator=generator, device=device, dtype=torch.float32)
        return (weight * INIT_STD).to(dtype).cpu()

    ones = lambda size: torch.ones(size, dtype=dtype)  # noqa: E731  (norm weights)
    weights = {
        "model.embed_tokens.weight": normal(arch.vocab_size, arch.hidden_size),
        "model.norm.weight": ones(arch.hidden_size),
        "lm_head.weight": normal(arch.vocab_size, arch.hidden_size),
    }
    for layer in range(arch.num_layers):
        prefix = f"model.layers.{layer}"
        for norm in arch.layer_norms:
            weights[f"{prefix}.{norm}.weight"] = ones(arch.hidden_size)
        for module in arch.linear_modules:
            in_features, out_features = arch.module_dims(module)
            name = f"{prefix}.{linear_parent(module)}.{module}.weight"
            weights[name] = normal(out_features, in_features)
    torch_dtype = str(dtype).removeprefix("torch.")
    tokenizer_config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    write_model(
        folder, replace(arch, torch_dtype=torch_dtype), weights, _tokenizer(arch), tokenizer_config
    )
    return folder


def build_adapter(
    folder: Path,
    arch: ModelArch,
    rank: int,
    target_modules: tuple[str, ...] = ATTENTION_MODULES,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    dora: bool = False,
) -> Path:
    """Write a random PEFT LoRA adapter (A and B both non-zero) for a model of `arch`; with
    `dora`, a DoRA one: magnitudes near the norm of build_model's rows (INIT_STD * sqrt(in)),
    so that g = m / ||W + sBA|| stays near 1 as a trained DoRA's does."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(arch.num_layers):
        for module in target_modules:
            in_features, out_features = arch.module_dims(module)
            prefix = f"base_model.model.model.layers.{layer}.{linear_parent(module)}.{module}"
            lora_a = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            lora_b = torch.randn(out_features, rank, generator=generator) * INIT_STD
            weights[f"{prefix}.lora_A.weight"] = lora_a.to(dtype)  # [r, in]
            weights[f"{prefix}.lora_B.weight"] = lora_b.to(dtype)  # [out, r]
            if dora:
                noise = 1 + 0.1 * torch.randn(out_features, generator=generator)
                magnitude = noise * INIT_STD * in_features**0.5  # [out]
                weights[f"{prefix}.lora_magnitude_vector"] = magnitude.to(dtype)
    write_adapter(folder, weights, rank, 2 * rank, list(target_modules), use_dora=dora)
    return folder


def _tokenizer(arch: ModelArch) -> Tokenizer:
    """A word-level vocabulary of exactly the model's size: the special tokens, one token
    per byte (byte-level characters), then words `w259 ...` (decoded text is the tokens'
    bytes, joined)."""
    vocab = {"<unk>": UNK_ID, "<s>": BOS_ID, "</s>": EOS_ID}
    for character in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[character] = len(vocab)
    vocab.update({f"w{index}": index for index in range(len(vocab), arch.vocab_size)})
    tokenizer = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cpu", help="where the random numbers are drawn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    arch = SHAPES[args.shape]
    build_model(args.output, arch, getattr(torch, args.dtype), args.device, args.seed)
    print(f"wrote {args.shape} {asdict(arch)} to {args.output}")


if __name__ == "__main__":
    main()
