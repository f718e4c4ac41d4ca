"""The bytes a decode step's LoRA must move, how fast the CPU native path moves them, and what
the GPU path must reach (issue 21, item 2).

    .venv/bin/python -P -m loraserve.bench.lora_bytes \\
        --output bench/results/2026-12-06-lora-bytes-cpu.json

The byte floor of a step's LoRA: A and B of every adapter in the batch, once, for every
targeted module of every layer, plus the activations the kernels must touch (x read, y
written and read back in float32, the base output read and written). The CPU figure times
the native C kernels (float32) on that shape, one decode batch of one token per adapter,
over `--layers` layers' worth of distinct weights (far past the CPU's caches, so memory is
what is timed), and scales to the model's layers; it is compared with a copy of the same
memory (bench/bandwidth.py). The GPU lines are arithmetic only: the floor at each card's
nominal HBM bandwidth, the issue's target (at most 1.3x that floor), and what the Triton
kernels' grid gives each program to move at this shape (kernels/lora_tiles.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loraserve.kernels.ops import LoraWeights, OutputSlices
from loraserve.models.arch import LORA_GROUPS, LORA_MODULES, ModelArch
from loraserve.models.batch import LoraBatch

from .bandwidth import copy_bandwidth
from .metrics import run_metadata
from .models import SHAPES

GPU_BANDWIDTH = {"H100 SXM (HBM3)": 3.35e12, "H200 (HBM3e)": 4.8e12}
"""Nominal bytes per second; a copy reaches ~85-90% of it (bench/results: 4.2 TB/s on H200)."""
TARGET_OVER_FLOOR = 1.3  # issue 21: LoRA overhead at most 1.3x its byte floor
GROUP_NAMES = ("qkv", "o", "gate_up", "down")
CONTEXT = 512  # the decode step: batch 32 at context 512


def group_dims(arch: ModelArch) -> list[tuple[str, int, tuple[int, ...]]]:
    """(name, input size, output size of each slice) of each LoRA projection group."""
    groups = []
    for name, modules in zip(GROUP_NAMES, LORA_GROUPS, strict=True):
        dims = [arch.module_dims(LORA_MODULES[module]) for module in modules]
        groups.append((name, dims[0][0], tuple(out for _, out in dims)))
    return groups


def lora_step_bytes(
    arch: ModelArch, num_adapters: int, rank: int, num_tokens: int, element_bytes: int
) -> dict[str, int]:
    """Bytes one decode step's LoRA must move, by kind (all layers, all 7 modules)."""
    weights = activations = y = 0
    for _, in_dim, widths in group_dims(arch):
        weights += num_adapters * rank * (len(widths) * in_dim + sum(widths)) * element_bytes
        activations += num_tokens * (in_dim + 2 * sum(widths)) * element_bytes  # x, out r+w
        y += 2 * num_tokens * len(widths) * rank * 4  # float32, written then read
    layers = arch.num_layers
    total = layers * (weights + activations + y)
    return dict(
        adapter_weights=layers * weights,
        activations=layers * activations,
        y=layers * y,
        total=total,
    )


def base_step_bytes(arch: ModelArch, num_seqs: int, context: int, element_bytes: int) -> int:
    """Weights read once (every linear layer and the LM head) plus the KV cache of the batch."""
    linear = sum(
        arch.module_dims(module)[0] * arch.module_dims(module)[1] for module in LORA_MODULES
    )
    weights = (arch.num_layers * linear + arch.vocab_size * arch.hidden_size) * element_bytes
    kv = num_seqs * context * arch.num_layers * 2 * arch.kv_size * element_bytes
    return weights + kv


def triton_grid(arch: ModelArch, num_tokens: int, rank: int, element_bytes: int) -> list[dict]:
    """Per launch of the Triton kernels on a decode batch (1-token tiles, BGMV) of distinct
    adapters: the bytes it must move, its floor on each card, its programs and the adapter
    bytes each program streams (the launchers' decode block sizes)."""
    shrink_rows, expand_columns = 8, 512
    launches = []
    for name, in_dim, widths in group_dims(arch):
        slices, out_dim = len(widths), sum(widths)
        y_bytes = num_tokens * slices * rank * 4
        shrink_bytes = (num_tokens * rank * slices + num_tokens) * in_dim * element_bytes + y_bytes
        expand_bytes = (num_tokens * rank + 2 * num_tokens) * out_dim * element_bytes + y_bytes
        launches.append(
            dict(
                group=name,
                shrink_bytes=shrink_bytes,
                expand_bytes=expand_bytes,
                floor_us={
                    card: [shrink_bytes / bandwidth * 1e6, expand_bytes / bandwidth * 1e6]
                    for card, bandwidth in GPU_BANDWIDTH.items()
                },
                shrink_programs=num_tokens * slices * -(-rank // shrink_rows),
                shrink_bytes_per_program=min(rank, shrink_rows) * in_dim * element_bytes,
                expand_programs=num_tokens * slices * -(-max(widths) // expand_columns),
                expand_bytes_per_program=rank * min(expand_columns, max(widths)) * element_bytes,
            )
        )
    return launches


def native_case(arch: ModelArch, num_adapters: int, rank: int, num_layers: int) -> dict[str, Any]:
    """A float32 pool holding every adapter's A and B for `num_layers` layers, packed, and the
    per-layer, per-group `LoraWeights` views the model would bind."""
    matrices = [
        (slot, layer, module, which, length)
        for slot in range(num_adapters)
        for layer in range(num_layers)
        for module, name in enumerate(LORA_MODULES)
        for which, length in enumerate(arch.module_dims(name))
    ]
    total = sum(rank * length for *_, length in matrices)
    pool = (torch.randn(1, total) * 0.02).contiguous()  # [1 page, every matrix packed]
    offsets = torch.full((num_adapters, num_layers, len(LORA_MODULES), 3), -1, dtype=torch.int64)
    used = 0
    for slot, layer, module, which, length in matrices:
        offsets[slot, layer, module, which] = used
        used += rank * length
    ranks = torch.full((num_adapters, num_layers, len(LORA_MODULES)), rank, dtype=torch.int32)
    layers = []
    for layer in range(num_layers):
        row = []
        for (name, in_dim, widths), group in zip(group_dims(arch), LORA_GROUPS, strict=True):
            modules = slice(group[0], group[-1] + 1)
            where = offsets[:, layer, modules]
            slices = OutputSlices.of([0, *np.cumsum(widths).tolist()], "cpu")
            weights = LoraWeights(
                pool, where[..., 0], where[..., 1], ranks[:, layer, modules], slices
            )
            row.append((name, in_dim, sum(widths), weights))
        layers.append(row)
    return dict(pool=pool, layers=layers)


def time_native(case: dict[str, Any], num_tokens: int, rank: int, repeats: int) -> list[float]:
    """Seconds of each timed pass of shrink + expand over every group of every layer held."""
    from loraserve.kernels import native

    starts = torch.arange(num_tokens + 1, dtype=torch.int32)  # one token per adapter
    segments = LoraBatch(starts, torch.arange(num_tokens, dtype=torch.int32), rank)
    inputs = {
        name: (torch.randn(num_tokens, in_dim), torch.randn(num_tokens, out_dim))
        for name, in_dim, out_dim, _ in case["layers"][0]
    }

    def one_pass() -> None:
        for row in case["layers"]:
            for name, _, _, weights in row:
                x, out = inputs[name]
                native.lora_expand(out, native.lora_shrink(x, weights, segments), weights, segments)

    one_pass()  # the library builds, pages fault in
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        one_pass()
        seconds.append(time.perf_counter() - start)
    return seconds


def gpu_arithmetic(lora_bytes: int, base_bytes: int) -> dict[str, dict[str, float]]:
    """The floor and the target of a step's LoRA kernels on each card, in ms."""
    cards = {}
    for card, bandwidth in GPU_BANDWIDTH.items():
        floor_ms = lora_bytes / bandwidth * 1e3
        cards[card] = dict(
            bandwidth_tb_s=bandwidth / 1e12,
            lora_floor_ms=floor_ms,
            lora_target_ms=TARGET_OVER_FLOOR * floor_ms,
            base_step_floor_ms=base_bytes / bandwidth * 1e3,
            lora_target_over_base=TARGET_OVER_FLOOR * lora_bytes / base_bytes,
        )
    return cards


def summary(result: dict[str, Any], num_layers: int) -> str:
    """The figures of a result in a few lines."""
    gpu, cpu = result["gpu_bf16_step_bytes"], result["cpu_native"]
    lines = [
        f"LoRA bytes per decode step (bf16): {gpu['total'] / 1e9:.3f} GB "
        f"(adapter weights {gpu['adapter_weights'] / 1e9:.3f} GB), "
        f"{result['lora_over_base']:.1%} of the base step's {result['base_step_bytes_bf16'] / 1e9:.2f} GB",
        f"CPU native (float32, {result['threads']} threads): {cpu['seconds_per_step']:.2f} s/step, "
        f"{cpu['bytes_per_second'] / 1e9:.2f} GB/s = {cpu['fraction_of_copy']:.0%} of a copy's "
        f"{cpu['copy_bytes_per_second'] / 1e9:.2f} GB/s (best pass {cpu['best_fraction_of_copy']:.0%})",
    ]
    launches = 2 * len(result["triton_decode_grid"]) * num_layers
    for card, figures in result["gpu"].items():
        lines.append(
            f"{card}: floor {figures['lora_floor_ms']:.3f} ms, target <= "
            f"{figures['lora_target_ms']:.3f} ms (+{figures['lora_target_over_base']:.1%} of a "
            f"{figures['base_step_floor_ms']:.2f} ms base floor) = "
            f"{figures['lora_target_ms'] * 1e3 / launches:.2f} us per launch over {launches}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-2-7b", choices=sorted(SHAPES))
    parser.add_argument(
        "--batch", type=int, default=32, help="sequences, one distinct adapter each"
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2, help="layers of distinct weights timed")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    arch = SHAPES[args.shape]
    gpu_bytes = lora_step_bytes(arch, args.batch, args.rank, args.batch, element_bytes=2)
    base = base_step_bytes(arch, args.batch, CONTEXT, element_bytes=2)
    cpu_bytes = lora_step_bytes(arch, args.batch, args.rank, args.batch, element_bytes=4)
    case = native_case(arch, args.batch, args.rank, args.layers)
    passes = time_native(case, args.batch, args.rank, args.repeats)
    # The best pass too: on a shared machine the median carries other processes' time.
    seconds, best = statistics.median(passes) / args.layers, min(passes) / args.layers
    per_layer_bytes = cpu_bytes["total"] / arch.num_layers
    copy = copy_bandwidth("cpu", numel=2**28)
    result = dict(
        **run_metadata(),
        command=" ".join(
            ["python -P -m loraserve.bench.lora_bytes", *(sys.argv[1:] if argv is None else argv)]
        ),
        shape=args.shape,
        batch=args.batch,
        rank=args.rank,
        threads=torch.get_num_threads(),
        gpu_bf16_step_bytes=gpu_bytes,
        base_step_bytes_bf16=base,
        lora_over_base=gpu_bytes["total"] / base,
        cpu_native=dict(
            float32_step_bytes=cpu_bytes,
            seconds_per_layer=seconds,
            seconds_per_step=seconds * arch.num_layers,
            bytes_per_second=per_layer_bytes / seconds,
            copy_bytes_per_second=copy,
            fraction_of_copy=per_layer_bytes / seconds / copy,
            best_seconds_per_layer=best,
            best_fraction_of_copy=per_layer_bytes / best / copy,
        ),
        gpu=gpu_arithmetic(gpu_bytes["total"], base),
        triton_decode_grid=triton_grid(arch, args.batch, args.rank, element_bytes=2),
    )
    print(json.dumps(result, indent=2))
    print(summary(result, arch.num_layers))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
