"""Random-weight models and PEFT adapters of real shapes, for benchmarks: no download.

A benchmark needs the *shapes* of Llama-2-7B or Llama-3-8B (what the kernels and
the memory traffic depend on), not their knowledge, so the weights are random
(normal, std 0.02, as transformers initialises them; norms at 1). The files are
those `transformers`' and `peft`'s `save_pretrained` write, written here with
torch and safetensors directly: initialising a 7B model through transformers on
a CPU takes minutes, a `torch.randn` on the GPU takes a second.

    python -m bench.models --shape cpu --output /tmp/bench-model
    python -m bench.models --shape llama-2-7b --dtype bfloat16 --device cuda --output /data/l2

The folder gets config.json, generation_config.json, model.safetensors (one file;
sharding is the loader's business and tested elsewhere), tokenizer.json (a word-level
vocabulary of the model's size: benchmarks send token ids, text is never compared)
and tokenizer_config.json.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraserve.models.hf_files import (
    generation_config,
    llama_config,
    lora_adapter_config,
    write_json,
)

BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
INIT_STD = 0.02


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-family model: all a benchmark needs of it."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_position_embeddings: int
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def module_dims(self, module: str) -> tuple[int, int]:
        """(input features, output features) of one projection."""
        kv_size = self.num_kv_heads * self.head_dim
        return {
            "q_proj": (self.hidden_size, self.hidden_size),
            "k_proj": (self.hidden_size, kv_size),
            "v_proj": (self.hidden_size, kv_size),
            "o_proj": (self.hidden_size, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }[module]


SHAPES: dict[str, ModelShape] = {
    # The CPU benchmark model: at least hidden 256 and 4 layers (issue 5), MHA.
    "cpu": ModelShape(1000, 256, 688, 4, 4, 4, 1024),
    "llama-2-7b": ModelShape(32000, 4096, 11008, 32, 32, 32, 4096),
    "llama-3-8b": ModelShape(128256, 4096, 14336, 32, 32, 8, 8192, rope_theta=500000.0),
}


def build_model(
    folder: Path,
    shape: ModelShape,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> Path:
    """Write a random-weight LlamaForCausalLM folder of `shape` to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(seed)

    def normal(*size: int) -> torch.Tensor:
        weight = torch.randn(*size, generator=generator, device=device, dtype=torch.float32)
        return (weight * INIT_STD).to(dtype).cpu()

    ones = lambda size: torch.ones(size, dtype=dtype)  # noqa: E731  (norm weights)
    weights = {
        "model.embed_tokens.weight": normal(shape.vocab_size, shape.hidden_size),
        "model.norm.weight": ones(shape.hidden_size),
        "lm_head.weight": normal(shape.vocab_size, shape.hidden_size),
    }
    for layer in range(shape.num_layers):
        prefix = f"model.layers.{layer}"
        weights[f"{prefix}.input_layernorm.weight"] = ones(shape.hidden_size)
        weights[f"{prefix}.post_attention_layernorm.weight"] = ones(shape.hidden_size)
        for module in ATTENTION_MODULES + MLP_MODULES:
            kind = "self_attn" if module in ATTENTION_MODULES else "mlp"
            in_features, out_features = shape.module_dims(module)
            weights[f"{prefix}.{kind}.{module}.weight"] = normal(out_features, in_features)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _write_config(folder, shape, dtype)
    _write_tokenizer(folder, shape)
    return folder


def build_adapter(
    folder: Path,
    shape: ModelShape,
    rank: int,
    target_modules: tuple[str, ...] = ATTENTION_MODULES,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random PEFT LoRA adapter (A and B both non-zero) for a model of `shape`."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(shape.num_layers):
        for module in target_modules:
            kind = "self_attn" if module in ATTENTION_MODULES else "mlp"
            in_features, out_features = shape.module_dims(module)
            prefix = f"base_model.model.model.layers.{layer}.{kind}.{module}"
            lora_a = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            lora_b = torch.randn(out_features, rank, generator=generator) * INIT_STD
            weights[f"{prefix}.lora_A.weight"] = lora_a.to(dtype)  # [r, in]
            weights[f"{prefix}.lora_B.weight"] = lora_b.to(dtype)  # [out, r]
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = lora_adapter_config(rank, 2 * rank, list(target_modules))
    write_json(folder / "adapter_config.json", config)
    return folder


def _write_config(folder: Path, shape: ModelShape, dtype: torch.dtype) -> None:
    config = llama_config(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rope_theta=shape.rope_theta,
        rms_norm_eps=1e-5,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        dtype=str(dtype).removeprefix("torch."),
    )
    write_json(folder / "config.json", config)
    write_json(folder / "generation_config.json", generation_config(BOS_ID, EOS_ID))


def _write_tokenizer(folder: Path, shape: ModelShape) -> None:
    """A word-level vocabulary `w3 w4 ...` of exactly the model's size (decoded text
    is the words joined by spaces)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": UNK_ID, "<s>": BOS_ID, "</s>": EOS_ID}
    vocab.update({f"w{index}": index for index in range(len(vocab), shape.vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    write_json(folder / "tokenizer_config.json", config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cpu", help="where the random numbers are drawn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    build_model(args.output, shape, getattr(torch, args.dtype), args.device, args.seed)
    print(f"wrote {args.shape} {asdict(shape)} to {args.output}")


if __name__ == "__main__":
    main()
