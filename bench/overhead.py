"""The LoRA step overhead and the decode rate against the memory-bandwidth ceiling.

One engine, one batch, decode-shaped: `--batch` requests with `--context`-token
prompts generate `--output-tokens` tokens each, first all on the base model, then
each on its own adapter (`--num-adapters` distinct adapters of `--rank`, cycled).
The decode time is the run's time less a prefill-only run's, so it is the cost of
`output_tokens - 1` decode steps. A decode step must read every weight, every
sequence's K/V and every adapter in the batch once; at the measured copy bandwidth
that takes the "ceiling" time, and the step's efficiency is ceiling / measured.

    python -m bench.overhead --shape llama-2-7b --dtype bfloat16 --device cuda \\
        --batch 32 --num-adapters 32 --rank 16 --context 512 --output-tokens 128
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from loraserve.models.arch import ModelArch

from .assets import default_cache_dir, ensure_assets
from .bandwidth import copy_bandwidth
from .metrics import run_metadata
from .models import ATTENTION_MODULES, SHAPES


def step_bytes(arch: ModelArch, args: argparse.Namespace, with_lora: bool) -> int:
    """What one decode step must read: weights, the batch's K/V, its adapters (on the
    attention projections, as bench/assets.py builds them)."""
    element = torch.finfo(getattr(torch, args.dtype)).bits // 8
    dims = {module: arch.module_dims(module) for module in arch.linear_modules}
    layer_weights = sum(i * o for i, o in dims.values())
    weights = arch.num_layers * layer_weights + arch.vocab_size * arch.hidden_size
    average_context = args.context + args.output_tokens / 2
    kv = args.batch * average_context * arch.num_layers * 2 * arch.kv_size
    adapter = arch.num_layers * sum(args.rank * sum(dims[m]) for m in ATTENTION_MODULES)
    adapters = min(args.num_adapters, args.batch) * adapter if with_lora else 0
    return int((weights + kv + adapters) * element)


def decode_seconds(llm, prompts: list[list[int]], adapters: list[str | None], tokens: int) -> float:
    """Time of `tokens - 1` decode steps of the whole batch (run time less prefill time)."""
    from loraserve import SamplingParams

    def run(max_tokens: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompt_token_ids=prompts, sampling_params=params, adapter=adapters)
        return time.perf_counter() - start

    run(tokens)  # warm-up: kernels compiled, adapters resident
    return min(run(tokens) for _ in range(2)) - min(run(1) for _ in range(2))


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    from loraserve import LLM

    arch = SHAPES[args.shape]
    model, adapters = ensure_assets(
        args.shape, (args.rank,), args.num_adapters, args.cache_dir, args.dtype
    )
    names = list(adapters)
    llm = LLM(
        str(model),
        adapters,
        device=args.device,
        dtype=args.dtype,
        max_lora_rank=max(args.rank, 16),
    )
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(
        3, arch.vocab_size, (args.batch, args.context), generator=generator
    ).tolist()
    bandwidth = copy_bandwidth(torch.device(args.device))
    steps = args.output_tokens - 1
    results = {}
    configurations: tuple[tuple[str, list[str | None]], ...] = (
        ("base", [None] * args.batch),
        ("lora", [names[index % len(names)] for index in range(args.batch)]),
    )
    for label, batch_adapters in configurations:
        seconds = decode_seconds(llm, prompts, batch_adapters, args.output_tokens)
        ceiling = step_bytes(arch, args, label == "lora") / bandwidth * steps
        results[label] = {
            "decode_step_ms": 1e3 * seconds / steps,
            "decode_tokens_per_s": args.batch * steps / seconds,
            "ceiling_step_ms": 1e3 * ceiling / steps,
            "fraction_of_ceiling": ceiling / seconds,
        }
        print(label, json.dumps(results[label]), flush=True)
    overhead = results["lora"]["decode_step_ms"] / results["base"]["decode_step_ms"] - 1
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; LoRA step overhead {100 * overhead:.1f}%")
    if args.output:
        result = {
            **run_metadata(),
            "args": {k: str(v) for k, v in vars(args).items()},
            "copy_bandwidth_gb_s": bandwidth / 1e9,
            "lora_step_overhead": overhead,
            **results,
        }
        args.output.write_text(json.dumps(result, indent=2) + "\n")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--num-adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--context", type=int, default=512, help="prompt tokens per request")
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--output", type=Path)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
