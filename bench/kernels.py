"""Kernel micro-benchmarks: the Triton LoRA and paged attention kernels at 7-8B shapes, bf16.

    python -m bench.kernels [--family lora|attention] [--json PATH] [--quick]

Measures the GPU's copy bandwidth first (bench/bandwidth.py: the ceiling of every
memory-bound kernel here), then for the Llama-2-7B and Llama-3-8B shapes of
bench/models.py, one kernel family after the other:

- bench/kernels_lora.py: LoRA shrink + expand of the qkv, gate_up and down groups at
  decode batches (1..256 tokens, 1..256 distinct adapters, ranks mixed from
  {8, 16, 32, 64}) and one prefill batch (8 sequences x 256 tokens, 8 adapters),
  against the torch reference and a `torch.mm` loop per adapter;
- bench/kernels_attention.py: paged attention decode at contexts 512/2048/4096 and
  batches 1..256, and prefill, against the torch reference (small cases) and torch's
  `scaled_dot_product_attention` on pre-gathered contiguous K/V.

How each is timed (CUDA-graph replays with a cold L2, and eager calls) is
bench/kernel_timing.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import torch

from . import kernels_attention, kernels_lora
from .bandwidth import copy_bandwidth
from .kernel_timing import DECODE_BATCHES, DTYPE, HEADER, Result, Timer
from .metrics import run_metadata
from .models import SHAPES

MODELS = ("llama-2-7b", "llama-3-8b")
"""bench/models.py shapes measured."""
FAMILIES = {"lora": kernels_lora.bench_lora, "attention": kernels_attention.bench_attention}


def write_report(
    path: str, results: list[Result], copy_gbs: float, families: list[str], quick: bool
) -> None:
    report = {
        **run_metadata(),
        "dtype": str(DTYPE),
        "copy_bandwidth_gbs": copy_gbs,
        "parameters": dict(
            families=families,
            rank_choices=kernels_lora.RANK_CHOICES,
            decode_batches=DECODE_BATCHES,
            adapter_counts=kernels_lora.ADAPTER_COUNTS,
            contexts=kernels_attention.CONTEXTS,
            block_size=kernels_attention.BLOCK_SIZE,
            models={name: asdict(SHAPES[name]) for name in MODELS},
            quick=quick,
        ),
        "results": [asdict(result) for result in results],
    }
    with open(path, "w") as file:
        json.dump(report, file, indent=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--family", choices=sorted(FAMILIES), action="append", help="default: every family"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    parser.add_argument("--quick", action="store_true", help="a few shapes only (a smoke run)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.kernels needs a CUDA GPU (the kernels run through Triton); nothing measured.")
        return 0
    families = args.family or list(FAMILIES)
    torch.manual_seed(0)
    timer = Timer(args.quick)
    copy_gbs = copy_bandwidth("cuda") / 1e9
    print(f"{torch.cuda.get_device_name()}: copy {copy_gbs:.0f} GB/s (read + write)")
    print(HEADER + "\n" + "-" * len(HEADER), flush=True)
    results: list[Result] = []
    for model_name in MODELS:
        for family in families:
            results += FAMILIES[family](model_name, SHAPES[model_name], copy_gbs, timer, args.quick)
        if args.json:  # after each model: a run cut short keeps what it measured
            write_report(args.json, results, copy_gbs, families, args.quick)
    print(
        "us: device time (CUDA graph, cold L2); eager: one eager call, launches included.\n"
        "vs base (device times): LoRA, a torch.mm loop per adapter; attention, SDPA on gathered\n"
        "contiguous K/V. vs ref (eager times): the torch reference in kernels/reference.py."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
