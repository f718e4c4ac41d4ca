"""loraserve against the PEFT baseline on the same trace, in one run, with one table.

    python -m bench.compare --preset cpu-s2                   # one run, both systems
    python -m bench.compare --preset cpu-s2 --sweep 1,8,64,512   # and the adapter sweep
    python -m bench.compare --preset cpu-s2 --dora-fraction 0.25 --skip-peft  # DoRA's cost

For each number of adapters: build (or reuse, from the cache) the preset's model and
adapters, draw the trace, start loraserve as a real server process on a free port of
127.0.0.1, replay the trace over HTTP, stop it, then run the same trace through the
PEFT baseline in this process. Both run one after the other on the same machine,
never at once. Results go to `bench/results/<date>-compare-<preset>.json`, and a
sweep also draws `bench/results/<date>-compare-<preset>.png`.

With `--dora-fraction F`, loraserve runs the trace twice: all adapters plain LoRA
(`loraserve`), then the same adapters with a fraction F of them DoRA (`loraserve-dora`:
same A and B, plus a magnitude vector each); the point records the throughput ratio and
the bytes the magnitude vectors add to a step (g of every targeted module, per DoRA
adapter in the batch, against that adapter's A and B bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .assets import default_cache_dir, ensure_assets
from .metrics import run_metadata, summarize
from .models import ATTENTION_MODULES, SHAPES
from .peft_baseline import PeftBaseline
from .replay import replay
from .servers import BASE_MODEL_NAME, loraserve_server
from .trace import PRESETS, Preset, TraceRequest, generate_trace

RESULTS = Path(__file__).parent / "results"


def run_loraserve(model, adapters, requests, args) -> dict:
    server_args = ["--device", args.device, "--dtype", args.dtype, *args.server_arg]
    with loraserve_server(model, adapters, server_args) as url:
        records, duration = asyncio.run(replay(url, requests, base_model=BASE_MODEL_NAME))
    return summarize(records, duration, args.slo_ttft)


def run_peft(model, adapters, requests, args) -> dict:
    baseline = PeftBaseline(
        model, adapters, args.device, getattr(torch, args.dtype), args.peft_max_batch
    )
    records, duration = baseline.run(requests)
    return summarize(records, duration, args.slo_ttft)


def run_point(preset: Preset, num_adapters: int, args) -> dict:
    """Both systems on one trace with `num_adapters` adapters."""
    vocab_size = SHAPES[preset.model].vocab_size
    params = replace(
        preset.trace, num_adapters=num_adapters, vocab_size=vocab_size, **_overrides(args)
    )
    requests: list[TraceRequest] = generate_trace(params)
    model, adapters = ensure_assets(
        preset.model, preset.ranks, num_adapters, args.cache_dir, args.dtype
    )
    point: dict = {
        "num_adapters": num_adapters,
        "trace": asdict(params),
        "num_requests": len(requests),
    }
    print(f"--- {num_adapters} adapters, {len(requests)} requests: loraserve", flush=True)
    point["loraserve"] = run_loraserve(model, adapters, requests, args)
    if args.dora_fraction > 0:
        _, mixed = ensure_assets(
            preset.model, preset.ranks, num_adapters, args.cache_dir, args.dtype,
            args.dora_fraction,
        )  # fmt: skip
        print(f"--- {num_adapters} adapters, {args.dora_fraction:g} DoRA: loraserve", flush=True)
        point["loraserve-dora"] = run_loraserve(model, mixed, requests, args)
        point["dora"] = dora_bytes(preset, args)
    if not args.skip_peft:
        print(f"--- {num_adapters} adapters: PEFT baseline", flush=True)
        point["peft"] = run_peft(model, adapters, requests, args)
    return point


def dora_bytes(preset: Preset, args) -> dict:
    """Bytes one DoRA adapter in a step reads for its g (every layer, every targeted module),
    beside the bytes of its A and B at the preset's mean rank."""
    arch, size = SHAPES[preset.model], torch.finfo(getattr(torch, args.dtype)).bits // 8
    dims = [arch.module_dims(module) for module in ATTENTION_MODULES]  # build_adapter's targets
    rank = sum(preset.ranks) / len(preset.ranks)
    magnitude = arch.num_layers * sum(out for _, out in dims) * size
    lora = arch.num_layers * sum(rank * (inp + out) for inp, out in dims) * size
    return {
        "fraction": args.dora_fraction,
        "magnitude_bytes_per_dora_adapter_step": magnitude,
        "lora_bytes_per_adapter_step_mean_rank": lora,
        "magnitude_over_lora": magnitude / lora,
    }


def _overrides(args) -> dict:
    names = ("req_rate", "duration", "seed", "cv", "alpha")
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    for name in ("input_range", "output_range"):
        if getattr(args, name):
            low, high = (int(part) for part in getattr(args, name).split(","))
            overrides[name] = (low, high)
    return overrides


COLUMNS = (  # (header, width, format, where in a summary)
    ("req/s", 8, ".2f", ("throughput_req_s",)),
    ("tok/s", 9, ".1f", ("output_tokens_per_s",)),
    ("TTFT p50", 10, ".3f", ("ttft_s", "p50")),
    ("p90", 8, ".3f", ("ttft_s", "p90")),
    ("p99", 8, ".3f", ("ttft_s", "p99")),
    ("TPOT p50", 10, ".4f", ("tpot_s", "p50")),
    ("SLO", 7, ".2f", ("slo_attainment",)),
    ("errors", 7, "d", ("errors",)),
)


def print_table(points: list[dict]) -> None:
    """One row per (system, number of adapters), and the throughput ratio per point."""
    print(f"{'system':<15}{'adapters':>9}" + "".join(f"{h:>{w}}" for h, w, _, _ in COLUMNS))
    for point in points:
        for system in ("loraserve", "loraserve-dora", "peft"):
            if system in point:
                cells = "".join(_cell(point[system], *column[1:]) for column in COLUMNS)
                print(f"{system:<15}{point['num_adapters']:>9}{cells}")
        if "peft" in point and point["peft"]["throughput_req_s"] > 0:
            ratio = point["loraserve"]["throughput_req_s"] / point["peft"]["throughput_req_s"]
            point["throughput_ratio"] = ratio
            print(f"{'':<15}{point['num_adapters']:>9}  loraserve / PEFT throughput: {ratio:.2f}x")
        if "loraserve-dora" in point and point["loraserve"]["throughput_req_s"] > 0:
            dora = (
                point["loraserve-dora"]["throughput_req_s"] / point["loraserve"]["throughput_req_s"]
            )
            point["dora_throughput_ratio"] = dora
            extra = point["dora"]["magnitude_over_lora"]
            print(f"{'':<15}{point['num_adapters']:>9}  with DoRA / all LoRA throughput: "
                  f"{dora:.3f}x; g adds {extra:.1%} to a DoRA adapter's bytes per step")  # fmt: skip


def _cell(summary: dict, width: int, spec: str, keys: tuple[str, ...]) -> str:
    value = summary
    for key in keys:
        value = value[key]
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    preset = PRESETS[args.preset]
    counts = (
        [int(n) for n in args.sweep.split(",")]
        if args.sweep
        else [args.num_adapters or preset.trace.num_adapters]
    )
    points = [run_point(preset, n, args) for n in counts]
    print_table(points)
    date = datetime.date.today().isoformat()
    output = (
        args.output
        or RESULTS / f"{date}-compare-{args.preset}{'-sweep' if args.sweep else ''}.json"
    )
    result = {
        **run_metadata(),
        "preset": args.preset,
        "model": preset.model,
        "args": _jsonable(vars(args)),
        "points": points,
    }
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")
    if len(points) > 1:
        try:
            from .plot import plot_sweep

            print(f"wrote {plot_sweep(result, output.with_suffix('.png'))}")
        except ModuleNotFoundError as missing:  # matplotlib comes with the `bench` extra
            print(f"no picture: {missing} (pip install -e '.[bench]')")


def _jsonable(values: dict) -> dict:
    return {key: str(value) if isinstance(value, Path) else value for key, value in values.items()}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-s2")
    parser.add_argument("--num-adapters", type=int, help="default: the preset's")
    parser.add_argument("--sweep", help="comma-separated numbers of adapters, e.g. 1,8,64,512")
    parser.add_argument("--req-rate", type=float, help="default: the preset's")
    parser.add_argument("--duration", type=float, help="default: the preset's")
    parser.add_argument("--cv", type=float, help="default: the preset's")
    parser.add_argument("--alpha", type=float, help="default: the preset's")
    parser.add_argument("--seed", type=int, help="default: the preset's")
    parser.add_argument("--input-range", help="LOW,HIGH prompt tokens (default: the preset's)")
    parser.add_argument("--output-range", help="LOW,HIGH output tokens (default: the preset's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--slo-ttft", type=float, default=6.0, help="TTFT bound of the SLO, s")
    parser.add_argument("--peft-max-batch", type=int, default=32)
    parser.add_argument("--skip-peft", action="store_true", help="loraserve only")
    parser.add_argument(
        "--dora-fraction",
        type=float,
        default=0.0,
        help="also run loraserve with this fraction of the adapters DoRA (e.g. 0.25)",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra `loraserve serve` argument (repeatable), e.g. --server-arg=--max-num-seqs=64",
    )
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--output", type=Path)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
