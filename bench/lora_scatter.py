"""The native LoRA kernels on one engine step of many adapters scattered over a large pool.

    python -m bench.lora_scatter
    python -m bench.lora_scatter --steps 40 --json out.json

What the 2000-adapter point of `bench.adapter_tiers sweep` asks of the CPU kernels, without
the server around them: the pool holds `--pool-adapters` rank-8 q/k/v/o adapters of the
bench's CPU model (bench/models.py: hidden 256, 4 layers, float32) in shuffled 128 KiB
pages, two pages an adapter, each page's matrices in the order the reader packs them (per
layer and module A, then B: memory/adapter_store.py); one step runs the shrink and expand of
q/k/v and of o in every layer, on ~250 decode tokens and 240 prefill tokens (six 40-token
chunks). A step names `--adapters` adapters, a fresh draw each step (as the sweep's running
batch turns over), so their weights come from memory, not from the caches: 229 rank-8
adapters weigh 58.6 MB a step, 4x the model (the count a step of the 2000-adapter sweep
point holds), against 5 adapters' 1.3 MB.

Reported per thread count and adapter count: the median and best milliseconds of a step over
`--steps` steps, and the adapters' bytes a step reads over the median time (GB/s).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time
from pathlib import Path

import torch

from loraserve.kernels import native
from loraserve.kernels.ops import LoraWeights, OutputSlices
from loraserve.models.batch import LoraBatch

from .metrics import run_metadata
from .models import SHAPES

MODEL = SHAPES["cpu"]
HIDDEN, NUM_LAYERS, RANK = MODEL.hidden_size, MODEL.num_layers, 8
MATRIX = RANK * HIDDEN  # elements of one A or B
PAGE_NUMEL = 8 * MATRIX * 2  # 128 KiB: two layers' q/k/v/o A and B
PACKED = ("A_q", "B_q", "A_k", "B_k", "A_v", "B_v", "A_o", "B_o")  # a layer's order in a page
PREFILL_CHUNKS, PREFILL_TOKENS, DECODE_TOKENS = 6, 40, 250


class ScatteredPool:
    """`num_adapters` adapters, two shuffled pages each; per layer the offset tables of the
    q/k/v group and of o, every rank RANK."""

    def __init__(self, num_adapters: int, seed: int) -> None:
        self.num_adapters = num_adapters
        num_pages = num_adapters * NUM_LAYERS // 2
        self.pool = torch.empty(num_pages * PAGE_NUMEL).normal_(0, 0.02)
        pages = list(range(num_pages))
        random.Random(seed).shuffle(pages)
        offsets = torch.empty(num_adapters, NUM_LAYERS, len(PACKED), dtype=torch.int64)
        for adapter in range(num_adapters):
            for layer in range(NUM_LAYERS):
                page = pages[adapter * NUM_LAYERS // 2 + layer // 2]
                first = page * PAGE_NUMEL + (layer % 2) * len(PACKED) * MATRIX
                for index in range(len(PACKED)):
                    offsets[adapter, layer, index] = first + index * MATRIX
        column = {name: index for index, name in enumerate(PACKED)}
        qkv = OutputSlices.of([0, HIDDEN, 2 * HIDDEN, 3 * HIDDEN], "cpu")
        o = OutputSlices.of([0, HIDDEN], "cpu")
        self.layers = []
        for layer in range(NUM_LAYERS):
            table = offsets[:, layer]
            groups = []
            for names, slices in ((("q", "k", "v"), qkv), (("o",), o)):
                a = table[:, [column[f"A_{name}"] for name in names]].contiguous()
                b = table[:, [column[f"B_{name}"] for name in names]].contiguous()
                ranks = torch.full((num_adapters, len(names)), RANK, dtype=torch.int32)
                groups.append(LoraWeights(self.pool, a, b, ranks, slices))
            self.layers.append(groups)


def step_batch(adapters: list[int]) -> LoraBatch:
    """The prefill chunks on the first adapters, then the decode tokens round-robin over all
    (grouped by adapter, as the runner orders a step's tokens)."""
    lengths = [PREFILL_TOKENS if index < PREFILL_CHUNKS else 0 for index in range(len(adapters))]
    for token in range(DECODE_TOKENS):
        lengths[token % len(adapters)] += 1
    starts = list(itertools.accumulate(lengths, initial=0))
    return LoraBatch(
        torch.tensor(starts, dtype=torch.int32), torch.tensor(adapters, dtype=torch.int32), RANK
    )


def time_steps(pool: ScatteredPool, num_adapters: int, steps: int, seed: int) -> list[float]:
    """Seconds of each of `steps` steps, each on a fresh draw of `num_adapters` adapters."""
    draw = random.Random(seed)
    seconds = []
    for _ in range(steps + 2):  # two warm-up steps
        batch = step_batch(draw.sample(range(pool.num_adapters), num_adapters))
        num_tokens = int(batch.segment_starts[-1])
        x = torch.randn(num_tokens, HIDDEN)
        outputs = [torch.zeros(num_tokens, group.slices.starts[-1]) for group in pool.layers[0]]
        started = time.perf_counter()
        for groups in pool.layers:
            for index, group in enumerate(groups):
                y = native.lora_shrink(x, group, batch)
                native.lora_expand(outputs[index], y, group, batch)
        seconds.append(time.perf_counter() - started)
    return seconds[2:]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool-adapters", type=int, default=2000)
    parser.add_argument("--adapters", default="5,229", help="adapters a step names")
    parser.add_argument("--threads", default="2,1", help="torch.set_num_threads, in turn")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", type=Path, help="write the rows and the machine here too")
    args = parser.parse_args(argv)
    pool = ScatteredPool(args.pool_adapters, seed=0)
    rows = []
    for threads in (int(count) for count in args.threads.split(",")):
        torch.set_num_threads(threads)
        for num_adapters in (int(count) for count in args.adapters.split(",")):
            seconds = time_steps(pool, num_adapters, args.steps, seed=num_adapters)
            median = statistics.median(seconds)
            megabytes = num_adapters * NUM_LAYERS * len(PACKED) * MATRIX * 4 / 1e6
            rows.append(
                {
                    "threads": threads,
                    "adapters": num_adapters,
                    "adapter_mb": round(megabytes, 1),
                    "step_ms_median": round(median * 1e3, 2),
                    "step_ms_best": round(min(seconds) * 1e3, 2),
                    "gb_per_s": round(megabytes / median / 1e3, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    if args.json is not None:
        results = {"run": run_metadata(), "args": vars(args) | {"json": str(args.json)}}
        args.json.write_text(json.dumps(results | {"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
