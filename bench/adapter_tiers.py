"""Thousands of adapters from disk: the S1-like sweep, and what a cold adapter costs the others.

    python -m bench.adapter_tiers sweep --counts 5,50,500,2000 --duration 10
    python -m bench.adapter_tiers cold --num-cold 12
    python -m bench.adapter_tiers steps --num-cold 12

`sweep` (S-LoRA's S1 on the CPU model): rank-8 adapters on q/k/v/o, uniform popularity,
the cpu-s1 trace (Poisson arrivals, 8..64-token prompts and outputs) replayed over HTTP
against a `loraserve serve` process that *lists* an adapter folder (`--adapter-dir`)
and reads each adapter on first use, with host RAM for `--max-cpu-loras` adapters
(fewer than the larger sets). Each count runs twice: as is, and with the first 64
adapters (or all, if fewer) pinned in the pool. Reported per point: throughput, TTFT
p50/p99, failed requests, adapters read from disk and copied into the pool (how many, and
their summed seconds, from the server's `vllm:lora_adapter_load_seconds`), the engine's
steps and their mean wall time (`loraserve_engine_step_seconds`), and the throughput
against the smallest count's (the target: at least 0.9x at 2000 adapters against 5). The
ratio compares capacities only where both points fell behind the offered rate: a server
that keeps up serves the offered rate whatever it could do. So the default rate (200
req/s) is above what the CPU model sustains on two cores, each point says whether it was
`at_capacity` (served under 90% of the offered rate), and the sweep warns when one was
not.

A single run moves by about ±5% on a shared 2-core machine: `--repeats N` runs every point
N times, in turn, and reports each point's median run, the median of the per-repeat ratios
(each repeat's point against the same repeat's smallest count, and a pinned point against
the same count unpinned) and every run's row.

`cold`: four background greedy streams on the base model; once they flow, a short
request naming a cold adapter (rank 64 on every module: about 5 MB to read) is sent
every `--interval` seconds, then the same requests again (their adapters now in the
pool). Reported: the background streams' median and worst gap between two chunks,
before, while the cold adapters are read, and while the same requests run warm (what
admitting a request costs the others anyway); with the reads on a loader thread
(`--adapter-load-workers 1`) and in the engine's own thread (`0`, the baseline without
overlap); and the time to first token of a request whose adapter is on disk, in the
pool (the second pass), and in host RAM (read by the load route first).

`steps`: the same in-process, without HTTP between the clock and the engine: the
engine core runs four decoding requests, and a request naming a cold adapter is added
every 12 steps. Reported per mode: the median step before, the slowest step while the
read is in flight, the step that admits the new request (its page copy and prefill),
and how long adding the request held the engine (the read itself, without overlap).

`sweep` and `cold` start one server at a time on a free port of 127.0.0.1; the client
runs in this process. Results go to `bench/results/<date>-adapter-tiers-<command>.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import re
import statistics
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from loraserve.models.arch import LORA_MODULES

from .assets import default_cache_dir, ensure_assets
from .hostile import Watch
from .metrics import run_metadata, summarize
from .models import SHAPES, build_adapter
from .replay import replay
from .servers import BASE_MODEL_NAME, loraserve_server
from .trace import PRESETS, TraceParams, adapter_name, generate_trace

RESULTS = Path(__file__).parent / "results"
PINNED = 64
AT_CAPACITY = 0.9
"""A sweep point served under this fraction of the offered rate: it measured capacity."""


def sweep_assets(count: int, cache_dir: Path) -> tuple[Path, Path]:
    """The sweep's model, and the folder of its first `count` rank-8 adapters (built once)."""
    model, adapters = ensure_assets("cpu", (8,), count, cache_dir, "float32")
    return model, next(iter(adapters.values())).parent  # holds every built rank-8 adapter


def sweep_trace(count: int, req_rate: float, duration: float) -> TraceParams:
    """The sweep's S1-like trace over `count` adapters."""
    return replace(
        PRESETS["cpu-s1"].trace,
        num_adapters=count,
        req_rate=req_rate,
        duration=duration,
        vocab_size=SHAPES["cpu"].vocab_size,
    )


def sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    counts = [int(count) for count in args.counts.split(",")]
    model, folder = sweep_assets(max(counts), args.cache_dir)
    runs: dict[tuple[int, bool], list[dict[str, Any]]] = {}
    for repeat in range(args.repeats):
        for pinned in (False, True):
            for count in counts:
                pins = [adapter_name(i) for i in range(min(PINNED, count))] if pinned else []
                point = _sweep_point(model, folder, count, pins, args)
                point["repeat"] = repeat
                print(json.dumps(_row(point)), flush=True)
                runs.setdefault((count, pinned), []).append(point)
    points = [_median_point(same) for same in runs.values()]
    for point in points:
        key = (point["num_adapters"], bool(point["pinned"]))
        ratios = _ratios(runs[key], runs[(counts[0], key[1])])
        point["throughput_vs_smallest"] = round(statistics.median(ratios), 3)
        point["throughput_vs_smallest_runs"] = [round(ratio, 3) for ratio in ratios]
        if key[1]:  # what pinning costs: against the same count unpinned
            ratios = _ratios(runs[key], runs[(key[0], False)])
            point["throughput_vs_unpinned"] = round(statistics.median(ratios), 3)
    if not all(run["at_capacity"] for same in runs.values() for run in same):
        print(
            "warning: some points kept up with the offered rate; their ratios say 'keeps up', "
            "not capacity: raise --req-rate",
            flush=True,
        )
    return points


def _ratios(runs: list[dict[str, Any]], against: list[dict[str, Any]]) -> list[float]:
    """Each repeat's throughput over the same repeat's of `against`."""
    return [
        run["throughput_req_s"] / other["throughput_req_s"]
        for run, other in zip(runs, against, strict=True)
    ]


def _median_point(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median throughput among `runs` of one point (the middle one of an odd
    number, the lower middle of an even), with every run's row beside it: a single run on
    a shared 2-core machine moves by ±5%, so `--repeats` runs the points in turn and each
    point reports its median."""
    ordered = sorted(runs, key=lambda run: run["throughput_req_s"])
    point = dict(ordered[(len(ordered) - 1) // 2])
    point.pop("repeat", None)
    point["errors"] = sum(run["errors"] for run in runs)
    point["runs"] = [_row(run) for run in runs]
    return point


def _sweep_point(
    model: Path, folder: Path, count: int, pins: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """One replay of the S1-like trace with `count` adapters listed and `pins` pinned."""
    params = sweep_trace(count, args.req_rate, args.duration)
    server_args = [*common_args(args), "--adapter-dir", str(folder)]
    server_args += ["--max-cpu-loras", str(args.max_cpu_loras)]
    server_args += [arg for name in pins for arg in ("--pin-adapter", name)]
    with loraserve_server(model, {}, server_args) as url:
        records, duration = asyncio.run(
            replay(url, generate_trace(params), base_model=BASE_MODEL_NAME)
        )
        text = httpx.get(f"{url}/metrics", timeout=30).text
    point = {"num_adapters": count, "pinned": len(pins), **summarize(records, duration)}
    point["offered_req_s"] = round(len(records) / args.duration, 2)
    point["at_capacity"] = point["throughput_req_s"] < AT_CAPACITY * point["offered_req_s"]
    for key, transition in (("disk_reads", "load"), ("pool_copies", "activate")):
        point[key] = _series(text, "vllm:lora_adapter_load_seconds_count", transition)
        # their summed seconds: the reads' (on the loader thread, beside the steps) and the
        # copies' (inside the steps)
        seconds = _series(text, "vllm:lora_adapter_load_seconds_sum", transition)
        point[f"{key}_seconds"] = round(seconds, 3)
    steps = _series(text, "loraserve_engine_step_seconds_count")
    step_seconds = _series(text, "loraserve_engine_step_seconds_sum")
    point["engine_steps"] = steps
    point["engine_step_ms"] = round(1000 * step_seconds / steps, 2) if steps else None
    return point


def _row(point: dict[str, Any]) -> dict[str, Any]:
    return {
        key: point[key]
        for key in ("num_adapters", "pinned", "throughput_req_s", "errors", "disk_reads")
    } | {"ttft_p99_s": point["ttft_s"]["p99"], "at_capacity": point["at_capacity"]}


def _cold_adapters(args: argparse.Namespace) -> Path:
    """The folder of rank-64, every-module adapters `cold-0000`...(built on first use)."""
    folder: Path = args.cache_dir / "cpu-float32" / "adapters-cold"
    for index in range(args.num_cold + 4):
        path = folder / f"cold-{index:04d}"
        if not (path / "adapter_config.json").is_file():
            build_adapter(path, SHAPES["cpu"], 64, LORA_MODULES, seed=1000 + index)
    return folder


def cold(args: argparse.Namespace) -> list[dict[str, Any]]:
    model, _ = ensure_assets("cpu", (8,), 0, args.cache_dir, "float32")
    folder = _cold_adapters(args)
    results = []
    for workers in (1, 0):
        server_args = [*common_args(args), "--adapter-dir", str(folder)]
        server_args += ["--adapter-load-workers", str(workers), "--max-cpu-loras", "4"]
        server_args += ["--allowed-adapter-root", str(folder)]
        with loraserve_server(model, {}, server_args) as url:
            result = _cold_run(url, args, folder)
        result["adapter_load_workers"] = workers
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def _cold_run(url: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    watch = Watch()
    threads = [
        threading.Thread(target=_background, args=(url, watch, i), daemon=True) for i in range(4)
    ]
    for thread in threads:
        thread.start()
    while len(watch.chunks) < 4 or not all(len(times) >= 5 for times in watch.chunks):
        time.sleep(0.05)
    warm = time.perf_counter()
    time.sleep(args.baseline)
    names = [f"cold-{index:04d}" for index in range(args.num_cold)]
    # The same requests twice, at the same pace: first their adapters are read from disk,
    # then they are in the pool, so the second pass is what admitting them costs anyway.
    phases = {"disk": _paced(url, names, args.interval), "pool": _paced(url, names, args.interval)}
    host = []
    for index in range(args.num_cold, args.num_cold + 4):
        name = f"cold-{index:04d}"
        body = {"lora_name": name, "lora_path": str(folder / name)}
        httpx.post(f"{url}/v1/load_lora_adapter", json=body, timeout=60).raise_for_status()
        host.append(_ttft(url, name))
    watch.stop.set()
    baseline = _gaps(watch, warm, phases["disk"][0])
    result: dict[str, Any] = {
        "baseline_median_gap_s": round(statistics.median(baseline), 4),
        "baseline_worst_gap_s": round(max(baseline), 4),
    }
    for phase, (start, end, ttfts) in phases.items():
        result[f"worst_gap_while_{phase}_requests_s"] = round(max(_gaps(watch, start, end)), 4)
        result[f"ttft_{phase}_s"] = _spread(ttfts)
    result["ttft_host_s"] = _spread(host)
    return result


def _paced(url: str, names: list[str], interval: float) -> tuple[float, float, list[float]]:
    """One short request per adapter, `interval` apart: (start, end, their TTFTs)."""
    start = time.perf_counter()
    ttfts = []
    for name in names:
        ttfts.append(_ttft(url, name))
        time.sleep(interval)
    return start, time.perf_counter(), ttfts


def steps(args: argparse.Namespace) -> list[dict[str, Any]]:
    from loraserve.engine.core.config import build_config
    from loraserve.engine.core.core import EngineCore
    from loraserve.engine.core.request import EngineRequest
    from loraserve.engine.core.sampling_params import SamplingParams

    model, _ = ensure_assets("cpu", (8,), 0, args.cache_dir, "float32")
    folder = _cold_adapters(args)
    results = []
    for workers in (1, 0):
        core = EngineCore(build_config(str(model), adapter_load_workers=workers))
        long = SamplingParams(max_tokens=900, temperature=0.0, ignore_eos=True)
        for index in range(4):
            core.add_request(EngineRequest(f"bg{index}", [5 + index] * 8, long))
        before = [_timed(core.step)[1] for _ in range(50)]
        reading: list[float] = []
        admitting: list[float] = []
        adding: list[float] = []
        for index in range(args.num_cold):
            name = f"cold-{index:04d}"
            params = SamplingParams(max_tokens=1, ignore_eos=True)
            request = EngineRequest(f"c{index}", [7] * 8, params, name, str(folder / name))
            adding.append(_timed(core.add_request, request)[1])
            for _ in range(12):
                was_in_host = core.catalog.in_host(name)
                outputs, seconds = _timed(core.step)
                (admitting if len(outputs) > 4 else reading if not was_in_host else before).append(
                    seconds
                )
        result = {
            "adapter_load_workers": workers,
            "median_step_s": round(statistics.median(before), 4),
            "slowest_step_while_reading_s": round(max(reading, default=0.0), 4),
            "median_admitting_step_s": round(statistics.median(admitting), 4),
            "median_engine_held_by_add_s": round(statistics.median(adding), 4),
        }
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def _timed(work: Any, *args: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    value = work(*args)
    return value, time.perf_counter() - started


def _background(url: str, watch: Watch, index: int) -> None:
    watch.stream(url, {"model": BASE_MODEL_NAME, "prompt": [5 + index] * 8, "max_tokens": 900})


def _ttft(url: str, model: str) -> float:
    """Seconds from sending a one-token streamed request on `model` to its first chunk."""
    body = {"model": model, "prompt": [7] * 8, "max_tokens": 1, "stream": True}
    sent = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                return time.perf_counter() - sent
    raise RuntimeError(f"no token from {model}")


def _gaps(watch: Watch, start: float, end: float) -> list[float]:
    """Gaps between consecutive chunks of each background stream that end in [start, end]."""
    return [
        after - before
        for times in watch.chunks
        for before, after in itertools.pairwise(times)
        if start <= after <= end
    ]


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 4),
        "max": round(max(values), 4),
        "n": len(values),
    }


def _series(text: str, name: str, transition: str | None = None) -> float:
    labels = "" if transition is None else rf'\{{transition="{transition}"\}}'
    pattern = rf"^{re.escape(name)}{labels} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def common_args(args: argparse.Namespace) -> list[str]:
    return ["--device", "cpu", "--dtype", "float32", *args.server_arg]


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    results = {"sweep": sweep, "cold": cold, "steps": steps}[args.command](args)
    date = datetime.date.today().isoformat()
    output = args.output or RESULTS / f"{date}-adapter-tiers-{args.command}.json"
    arguments = {key: str(value) for key, value in vars(args).items()}
    record = {**run_metadata(), "args": arguments, "results": results}
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {output}")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["sweep", "cold", "steps"])
    parser.add_argument("--counts", default="5,50,500,2000", help="sweep: numbers of adapters")
    parser.add_argument("--duration", type=float, default=10.0, help="sweep: trace seconds")
    parser.add_argument(
        "--req-rate", type=float, default=200.0, help="sweep: requests/s offered (above capacity)"
    )
    parser.add_argument("--max-cpu-loras", type=int, default=256, help="sweep: host budget")
    parser.add_argument(
        "--repeats", type=int, default=1, help="sweep: runs of every point, in turn (medians)"
    )
    parser.add_argument("--num-cold", type=int, default=12, help="cold: cold requests sent")
    parser.add_argument("--interval", type=float, default=0.3, help="cold: s between them")
    parser.add_argument("--baseline", type=float, default=2.0, help="cold: s watched before")
    parser.add_argument(
        "--server-arg", action="append", default=[], help="extra `loraserve serve` argument"
    )
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--output", type=Path)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
