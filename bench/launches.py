"""Kernel launches of one decode step, per decoder layer and by kernel, counted on the CPU.

    TRITON_INTERPRET=1 python -m bench.launches                # the table
    TRITON_INTERPRET=1 python -m bench.launches --json out.json

A decode step on CUDA is a captured graph whose every kernel costs 2-3 us of device time
however small, so its launch count is a budget (issue 21: at most 14 per layer with LoRA
on all seven modules, 8 without an adapter; now 13 and 8, pinned by
tests/models/test_launch_budget.py). This counts what would launch on CUDA, without a
GPU: the engine runs a tiny Llama-shape model (2 layers) with the Triton kernels (under
Triton's interpreter on a CPU), and during one decode forward

- every ATen operator that would launch a device kernel is one launch (`aten.mul`, ...):
  views, allocations and other metadata-only operators (`VIEW_OPS`, and any whose schema
  says it returns a view) launch nothing and are not counted;
- every Triton kernel launch is one launch (`triton:<kernel>`); the torch operators the
  interpreter itself runs to emulate it are not counted.

Each launch is attributed to the decoder layer whose `LlamaModel._layer` call made it, or
to `outside` (embedding, RoPE table gather, final norm, LM head). The zeroing of a split-K
shrink happens on CUDA only (the CPU never splits K), so it is not seen here.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from loraserve.models.arch import LORA_MODULES
from loraserve.models.hf_files import llama_arch

from .metrics import run_metadata
from .models import build_adapter, build_model

OUTSIDE = "outside"
"""The layer key of launches made outside every decoder layer."""

VIEW_OPS = frozenset(
    {
        "view",
        "_unsafe_view",
        "reshape",
        "split",
        "split_with_sizes",
        "chunk",
        "unbind",
        "unsqueeze",
        "squeeze",
        "slice",
        "select",
        "t",
        "transpose",
        "permute",
        "as_strided",
        "expand",
        "detach",
        "alias",
        "empty",
        "empty_strided",
        "empty_like",
        "new_empty",
        "new_empty_strided",
        "lift_fresh",
        "_reshape_alias",
    }
)
"""ATen operators that move no data on the device: views and allocations."""

TINY_ARCH = llama_arch(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
)
"""The counted model: Llama's layer (GQA), small enough for the interpreter."""

BATCH = 4  # decoding sequences
PROMPT = [5, 6, 7, 8, 9]  # each sequence's prompt (its first token varies)
RANKS = (8, 16)  # the adapters of the LoRA case, dealt out to the sequences in turn


@dataclass
class LaunchCount:
    """Launches of one forward pass: `layers[i][kernel]` and `outside[kernel]`."""

    layers: list[collections.Counter[str]] = field(default_factory=list)
    outside: collections.Counter[str] = field(default_factory=collections.Counter)

    def per_layer(self) -> list[int]:
        """Total launches of each decoder layer."""
        return [sum(counter.values()) for counter in self.layers]

    def record(self, layer: int | None, kernel: str) -> None:
        if layer is None:
            self.outside[kernel] += 1
            return
        while len(self.layers) <= layer:
            self.layers.append(collections.Counter())
        self.layers[layer][kernel] += 1

    def as_json(self) -> dict[str, Any]:
        return {
            "per_layer_total": self.per_layer(),
            "layers": [dict(sorted(counter.items())) for counter in self.layers],
            OUTSIDE: dict(sorted(self.outside.items())),
        }


class LaunchRecorder:
    """The state the patched entry points share while a count runs (`counting_launches`):
    what was counted, and the decoder layer launches are attributed to (None: outside)."""

    def __init__(self) -> None:
        self.count = LaunchCount()
        self.layer: int | None = None
        self.in_triton = False  # the interpreter's own torch calls are not launches


class _AtenLaunches(TorchDispatchMode):
    """Records every ATen operator that would launch a device kernel."""

    def __init__(self, recorder: LaunchRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not self.recorder.in_triton and not _moves_nothing(func, name, args, out):
            self.recorder.count.record(self.recorder.layer, f"aten.{name}")
        return out


def _moves_nothing(func: torch._ops.OpOverload, name: str, args: tuple, out: Any) -> bool:
    """A view or an allocation; an operator that may alias (`to`, `contiguous`) only when
    it did: its result shares its first argument's storage."""
    if name in VIEW_OPS:
        return True
    if not func.is_view:
        return False
    first = next(iter(args), None)
    result = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(first, torch.Tensor) or not isinstance(result, torch.Tensor):
        return True
    return first.untyped_storage().data_ptr() == result.untyped_storage().data_ptr()


@contextlib.contextmanager
def _triton_launches(recorder: LaunchRecorder) -> Iterator[None]:
    """Patch the launch of every Triton kernel (compiled, or interpreted on a CPU)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    originals = {kind: kind.run for kind in (InterpretedFunction, JITFunction)}

    def counted(run: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(run)
        def launch(self, *args, grid, warmup, **kwargs):
            if warmup or recorder.in_triton:
                return run(self, *args, grid=grid, warmup=warmup, **kwargs)
            recorder.count.record(recorder.layer, f"triton:{self.fn.__name__}")
            recorder.in_triton = True
            try:
                return run(self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                recorder.in_triton = False

        return launch

    try:
        for kind, run in originals.items():
            kind.run = counted(run)  # type: ignore[method-assign]
        yield
    finally:
        for kind, run in originals.items():
            kind.run = run  # type: ignore[method-assign]


@contextlib.contextmanager
def counting_launches(recorder: LaunchRecorder | None = None) -> Iterator[LaunchRecorder]:
    """Count the launches made inside the block into `recorder` (a fresh one by default),
    each attributed to `recorder.layer` as it is when the launch happens."""
    recorder = recorder or LaunchRecorder()
    with _triton_launches(recorder), _AtenLaunches(recorder):
        yield recorder


@contextlib.contextmanager
def count_forward_launches(model: Any) -> Iterator[list[LaunchCount]]:
    """Count the launches of every `model.forward` call made inside the block: one
    LaunchCount per call, appended to the yielded list as each call ends.

    `model` is a models.llama.LlamaModel; its `forward` and `_layer` are wrapped on the
    instance (attribution to layers) and restored on exit."""
    counts: list[LaunchCount] = []
    forward, layer_fn = model.forward, model._layer

    def counted_forward(batch):
        recorder = LaunchRecorder()
        layer_index = iter(range(len(model.layers)))

        def counted_layer(*args, **kwargs):
            recorder.layer = next(layer_index)
            try:
                return layer_fn(*args, **kwargs)
            finally:
                recorder.layer = None

        model._layer = counted_layer
        try:
            with counting_launches(recorder):
                logits = forward(batch)
        finally:
            del model._layer
        counts.append(recorder.count)
        return logits

    model.forward = counted_forward
    try:
        yield counts
    finally:
        del model.forward


def count_decode_launches(
    model_dir: Path, adapters: dict[str, Path], names: list[str | None], dtype: str
) -> LaunchCount:
    """Launches of one decode forward of `len(names)` sequences (sequence i on adapter
    `names[i]`, None: the base model), Triton kernels, the tiny model at `model_dir`."""
    from loraserve import LLM, SamplingParams

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        raise RuntimeError("on a CPU, set TRITON_INTERPRET=1 before Python starts")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    llm = LLM(
        model_dir,
        adapters=adapters,
        device=device,
        dtype=dtype,
        kernel_backend="triton",
        enforce_eager=True,  # the graph replays the same launches; eager lets them be seen
    )
    prompts = [[3 + index, *PROMPT] for index in range(len(names))]
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    model = llm.engine.runner.model
    with count_forward_launches(model) as counts:
        llm.generate(prompt_token_ids=prompts, sampling_params=params, adapter=names)
    # A prefill forward, then the decode forward that makes each sequence's second token.
    return counts[-1]


def build_tiny_assets(root: Path, dtype: torch.dtype) -> tuple[Path, dict[str, Path]]:
    """TINY_ARCH's model folder and an adapter of each of RANKS on all seven modules."""
    model = build_model(root / "model", TINY_ARCH, dtype)
    adapters = {
        f"all7-r{rank}": build_adapter(
            root / f"all7-r{rank}", TINY_ARCH, rank, LORA_MODULES, seed=rank, dtype=dtype
        )
        for rank in RANKS
    }
    return model, adapters


def measure(dtype: str) -> dict[str, LaunchCount]:
    """The two cases of the budget: every sequence on an adapter of all seven modules,
    and no adapter at all."""
    with tempfile.TemporaryDirectory() as folder:
        model, adapters = build_tiny_assets(Path(folder), getattr(torch, dtype))
        names = list(adapters)
        on_adapters: list[str | None] = [names[i % len(names)] for i in range(BATCH)]
        return {
            "lora_all7": count_decode_launches(model, adapters, on_adapters, dtype),
            "no_adapter": count_decode_launches(model, adapters, [None] * BATCH, dtype),
        }


def format_table(cases: dict[str, LaunchCount]) -> str:
    """One row per kernel, one column per case and layer, then the totals."""
    columns = [
        (case, key) for case, count in cases.items() for key in [*range(len(count.layers)), OUTSIDE]
    ]
    kernels = sorted(
        {
            kernel
            for count in cases.values()
            for counter in [*count.layers, count.outside]
            for kernel in counter
        }
    )

    def cell(case: str, key: int | str, kernel: str | None) -> str:
        count = cases[case]
        counter = count.outside if key == OUTSIDE else count.layers[int(key)]
        return str(sum(counter.values()) if kernel is None else counter.get(kernel, 0))

    names = [f"{case} {'L' + str(key) if key != OUTSIDE else key}" for case, key in columns]
    width = max(len(kernel) for kernel in [*kernels, "kernel"])
    lines = ["  ".join(["kernel".ljust(width), *names])]
    for kernel in [*kernels, None]:
        label = "total" if kernel is None else kernel
        cells = [
            cell(case, key, kernel).rjust(len(name))
            for (case, key), name in zip(columns, names, strict=True)
        ]
        lines.append("  ".join([label.ljust(width), *cells]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dtype", default="float16", help="model dtype (the GPU runs bf16 or fp16)"
    )
    parser.add_argument("--json", type=Path, help="write the counts and the machine here")
    args = parser.parse_args(argv)
    cases = measure(args.dtype)
    print(format_table(cases))
    for case, count in cases.items():
        print(f"{case}: launches per decoder layer {count.per_layer()}")
    if args.json:
        report = {
            "dtype": args.dtype,
            "model": "bench.launches.TINY_ARCH (Llama shape, 2 layers, GQA)",
            "batch": BATCH,
            "cases": {case: count.as_json() for case, count in cases.items()},
            **run_metadata(),
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
