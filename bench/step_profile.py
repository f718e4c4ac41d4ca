"""Host time and torch calls per decode step, by batch size and number of adapters.

    python -m bench.step_profile                          # the table, on the cpu-s2 model
    python -m bench.step_profile --batches 1,16,64 --adapters 1,64 --output result.json

For each (batch, adapters) point, `batch` requests of a 16-token prompt each run
through the engine together (adapters dealt out round-robin, ranks of the preset in
turn); every step in which every request decodes one token is a decode step. Two
passes over the same requests: one timed (wall time of `engine.step()`, median over
decode steps), one counting the torch operators a decode step dispatches (every ATen
operator seen by a `TorchDispatchMode`, which adds its own cost, hence two passes;
calls of the native C kernels are not torch operators and are not counted). On a CPU
the wall time is host time: the device is the host.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

from .assets import default_cache_dir, ensure_assets
from .metrics import run_metadata
from .trace import PRESETS

PROMPT_TOKENS = 16
DECODE_TOKENS = 24


class _CallCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched: each is one kernel call (on CUDA, a launch)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _decode_steps(llm, batch: int, names: list[str], count_calls: bool) -> list[float]:
    """Per decode step: seconds (count_calls False) or torch calls (True)."""
    from loraserve import SamplingParams
    from loraserve.engine.core.request import EngineRequest

    engine = llm.engine
    params = SamplingParams(max_tokens=DECODE_TOKENS, temperature=0.0, ignore_eos=True)
    prompts = [[3 + (i + j) % 900 for j in range(PROMPT_TOKENS)] for i in range(batch)]
    adapters = [names[i % len(names)] for i in range(batch)]
    for index, (prompt, adapter) in enumerate(zip(prompts, adapters, strict=True)):
        engine.add_request(EngineRequest(f"profile-{count_calls}-{index}", prompt, params, adapter))
    figures = []
    while engine.has_unfinished_requests():
        decoding = engine.scheduler.num_waiting() == 0 and all(
            state.seq.num_computed_tokens == state.seq.num_tokens - 1
            for state in engine.requests.values()
        )
        if count_calls:
            with _CallCounter() as counter:
                engine.step()
            value = float(counter.calls)
        else:
            start = time.perf_counter()
            engine.step()
            value = time.perf_counter() - start
        if decoding and len(engine.requests) == batch:
            figures.append(value)
    return figures


def profile_point(llm, batch: int, names: list[str]) -> dict:
    _decode_steps(llm, batch, names, count_calls=False)  # warm-up
    times = _decode_steps(llm, batch, names, count_calls=False)
    calls = _decode_steps(llm, batch, names, count_calls=True)
    return {
        "batch": batch,
        "num_adapters": len(names),
        "ms_per_decode_step": 1000 * statistics.median(times),
        "torch_calls_per_decode_step": statistics.median(calls),
        "num_decode_steps": len(times),
    }


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    from loraserve import LLM

    preset = PRESETS[args.preset]
    batches = [int(b) for b in args.batches.split(",")]
    counts = [int(n) for n in args.adapters.split(",")]
    model, adapters = ensure_assets(
        preset.model, preset.ranks, max(counts), args.cache_dir, "float32"
    )
    llm = LLM(str(model), adapters, device="cpu", dtype="float32")
    points = []
    print(f"{'batch':>6}{'adapters':>10}{'ms/step':>10}{'torch calls/step':>18}")
    for num_adapters in counts:
        names = list(adapters)[:num_adapters]
        for batch in batches:
            point = profile_point(llm, batch, names)
            points.append(point)
            print(
                f"{batch:>6}{num_adapters:>10}{point['ms_per_decode_step']:>10.2f}"
                f"{point['torch_calls_per_decode_step']:>18.0f}",
                flush=True,
            )
    if args.output:
        result = {**run_metadata(), "preset": args.preset, "points": points}
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-s2")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--adapters", default="1,64")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--output", type=Path)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
