"""Tensor parallelism: the collectives of a decode step, their bytes, and TP=N vs TP=1.

    python -m bench.tp                                    # the CPU model, TP 1 and 2 (gloo)
    python -m bench.tp --shape llama-2-7b --dtype bfloat16 --device cuda --sizes 1,2

One batch, decode-shaped, every request on its own adapter (`--num-adapters` of rank
`--rank` on q/k/v/o, bench/assets.py): the decode step time is a run's time less a
one-token run's, over `output_tokens - 1` steps; the collectives are rank 0's counts over
the same steps (engine/runner/collectives.py). Besides the measurement, the arithmetic of
`--arith-shape` at `--arith-batch`: the collectives a step makes per layer and their bytes,
the LoRA groups' share (none: models/tensor_parallel.py), and the adapter bytes one rank
reads against an even split (what vLLM's `--fully-sharded-loras` would save).

On a CPU the ranks are processes sharing the same cores over gloo: the figure says what
the communication and the process hops cost here, never a speed claim.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from loraserve.models.arch import LORA_MODULES, ModelArch
from loraserve.models.tensor_parallel import ROW_PARALLEL, shard_arch

from .assets import default_cache_dir, ensure_assets
from .metrics import run_metadata
from .models import ATTENTION_MODULES, SHAPES


def arithmetic(arch: ModelArch, size: int, batch: int, rank: int, element: int) -> dict[str, Any]:
    """Per decode step at `batch` one-token sequences, TP `size`: the collectives and their
    bytes (each rank's contribution), and one adapter's bytes per rank (LoRA on all 7 modules)."""
    hidden_bytes = batch * arch.hidden_size * element
    vocab_slice = -(-arch.vocab_size // size)
    per_rank = shard_arch(arch, size)
    lora_per_rank = lora_even = 0
    for module in LORA_MODULES:
        in_features, out_features = arch.module_dims(module)
        rank_in, rank_out = per_rank.module_dims(module)
        if module in ROW_PARALLEL:  # A split by input columns, B whole
            lora_per_rank += rank * (rank_in + out_features)
        else:  # A whole, B split by output rows
            lora_per_rank += rank * (in_features + rank_out)
        lora_even += rank * (in_features + out_features) / size
    return {
        "tensor_parallel_size": size,
        "batch": batch,
        "all_reduce_per_layer": 2,
        "all_reduce_bytes_per_layer": 2 * hidden_bytes,
        "all_reduce_outside_layers": 1,  # the embedding
        "all_gather_per_step": 1,  # the logits
        "all_gather_bytes": batch * vocab_slice * element,
        "bytes_per_step": (2 * arch.num_layers + 1) * hidden_bytes + batch * vocab_slice * element,
        "lora_collectives_per_layer": 0,
        "lora_bytes_per_layer": 0,
        "adapter_bytes_per_rank_per_layer": lora_per_rank * element,
        "adapter_bytes_even_split_per_layer": int(lora_even * element),
    }


def decode_time(llm: Any, prompts: list[list[int]], adapters: list[str], tokens: int) -> float:
    from loraserve import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    llm.generate(prompt_token_ids=prompts, sampling_params=params, adapter=adapters, use_tqdm=False)
    return time.perf_counter() - started


def measure(args: argparse.Namespace, size: int) -> dict[str, Any]:
    from loraserve import LLM

    model, folders = ensure_assets(
        args.shape, (args.rank,), args.num_adapters, args.cache_dir, args.dtype
    )
    llm = LLM(
        model,
        adapters=folders,
        device=args.device,
        dtype=args.dtype,
        tensor_parallel_size=size,
        max_num_seqs=args.batch,
        max_model_len=args.context + args.output_tokens + 8,
    )
    names = list(folders)
    adapters = [names[i % len(names)] for i in range(args.batch)]
    prompts = [[(7 * i + j) % 900 + 50 for j in range(args.context)] for i in range(args.batch)]
    decode_time(llm, prompts, adapters, 2)  # warm: every adapter in the pool
    runs = []
    collectives = getattr(llm.engine.runner, "collectives", None)
    for _ in range(args.repeats):
        before = _counts(collectives)
        full = decode_time(llm, prompts, adapters, args.output_tokens)
        middle = _counts(collectives)
        prefill = decode_time(llm, prompts, adapters, 1)
        after = _counts(collectives)
        steps = args.output_tokens - 1
        run: dict[str, Any] = {"decode_step_ms": (full - prefill) / steps * 1e3}
        if collectives is not None:  # the decode steps' share: the full run's less the prefill's
            run["per_decode_step"] = {
                key: (2 * middle[key] - before[key] - after[key]) / steps for key in middle
            }
        runs.append(run)
    best = min(runs, key=lambda run: run["decode_step_ms"])
    return {"tensor_parallel_size": size, "best": best, "runs": runs}


def _counts(collectives: Any) -> dict[str, int]:
    """Rank 0's collectives and bytes so far ({} on one device)."""
    if collectives is None:
        return {}
    counts = {f"{kind}_calls": count for kind, count in collectives.calls.items()}
    counts.update({f"{kind}_bytes": count for kind, count in collectives.bytes.items()})
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="cpu", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="1,2", help="tensor-parallel sizes, comma-separated")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--num-adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=17)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arith-shape", default="llama-2-7b", choices=sorted(SHAPES))
    parser.add_argument("--arith-batch", type=int, default=32)
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    arch = SHAPES[args.arith_shape]
    element = torch.finfo(torch.bfloat16).bits // 8
    results: dict[str, Any] = {
        **run_metadata(),
        "args": {key: str(value) for key, value in vars(args).items()},
        "adapter_modules": list(ATTENTION_MODULES),
        "arithmetic": {
            f"{args.arith_shape} bf16 tp{size}": arithmetic(
                arch, size, args.arith_batch, args.rank, element
            )
            for size in sizes
            if size > 1
        },
        "measured": [measure(args, size) for size in sizes],
    }
    for name, figures in results["arithmetic"].items():
        print(
            f"{name}, batch {figures['batch']}: {figures['all_reduce_per_layer']} all-reduces "
            f"per layer ({figures['all_reduce_bytes_per_layer'] / 1024:.0f} KiB), 1 all-gather of "
            f"the logits ({figures['all_gather_bytes'] / 1024:.0f} KiB), "
            f"{figures['bytes_per_step'] / 2**20:.1f} MiB a step; LoRA adds "
            f"{figures['lora_collectives_per_layer']} collectives; one rank-{args.rank} adapter "
            f"on all 7 modules: {figures['adapter_bytes_per_rank_per_layer'] / 1024:.0f} KiB a "
            f"layer per rank ({figures['adapter_bytes_even_split_per_layer'] / 1024:.0f} KiB if "
            "fully sharded)"
        )
    base = results["measured"][0]["best"]["decode_step_ms"]
    for entry in results["measured"]:
        best = entry["best"]
        line = f"TP={entry['tensor_parallel_size']}: decode step {best['decode_step_ms']:.2f} ms"
        line += f" ({best['decode_step_ms'] / base:.2f}x TP={sizes[0]})"
        if "per_decode_step" in best:
            step = best["per_decode_step"]
            sent = step.get("all_reduce_bytes", 0) + step.get("all_gather_bytes", 0)
            line += (
                f"; a decode step: {step.get('all_reduce_calls', 0):.0f} all-reduces, "
                f"{step.get('all_gather_calls', 0):.0f} all-gather, {sent / 1024:.0f} KiB per rank"
            )
        print(line)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
