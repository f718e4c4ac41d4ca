"""Offline engine throughput: a batch of requests through `LLM.generate`, no HTTP.

Measures one kernel backend at a time on a preset's model and adapters, so the CPU
paths (`native` C kernels, `torch`) can be set against the plain references (`reference`):

    python -m bench.engine_throughput --preset cpu-s2 --num-adapters 64 --kernel-backend reference
    python -m bench.engine_throughput --preset cpu-s2 --num-adapters 64 --kernel-backend torch
    python -m bench.engine_throughput --preset cpu-s2 --num-adapters 64 --kernel-backend native

Every request is queued at once (`--requests`, prompt and output lengths drawn from
the preset's ranges, adapters uniformly), so the engine runs at its largest batches.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from loraserve.kernels.dispatch import KERNEL_BACKENDS

from .assets import default_cache_dir, ensure_assets
from .models import SHAPES
from .trace import PRESETS


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    from loraserve import LLM, SamplingParams

    preset = PRESETS[args.preset]
    model, adapters = ensure_assets(
        preset.model, preset.ranks, args.num_adapters, args.cache_dir, args.dtype
    )
    llm = LLM(
        str(model),
        adapters,
        device=args.device,
        dtype=args.dtype,
        kernel_backend=args.kernel_backend,
    )
    rng = random.Random(args.seed)
    (low_in, high_in), (low_out, high_out) = preset.trace.input_range, preset.trace.output_range
    vocab_size = SHAPES[preset.model].vocab_size
    prompts = [
        [rng.randrange(3, vocab_size) for _ in range(rng.randint(low_in, high_in))]
        for _ in range(args.requests)
    ]
    names = [rng.choice(list(adapters)) for _ in range(args.requests)]
    params = [
        SamplingParams(max_tokens=rng.randint(low_out, high_out), temperature=0.0, ignore_eos=True)
        for _ in range(args.requests)
    ]
    llm.generate(prompt_token_ids=prompts[:8], sampling_params=params[:8], adapter=names[:8])
    start = time.perf_counter()
    llm.generate(prompt_token_ids=prompts, sampling_params=params, adapter=names)
    seconds = time.perf_counter() - start
    tokens = sum(p.max_tokens or 0 for p in params)
    print(
        f"{args.kernel_backend} backend, {args.num_adapters} adapters, {args.requests} requests: "
        f"{args.requests / seconds:.1f} req/s, {tokens / seconds:.0f} output tok/s"
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-s2")
    parser.add_argument("--num-adapters", type=int, default=64)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--kernel-backend", default="torch", choices=KERNEL_BACKENDS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
