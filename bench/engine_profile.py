"""Where the engine thread's time goes at a point of `bench.adapter_tiers sweep`: cProfile.

    python -m bench.engine_profile --count 2000
    python -m bench.engine_profile --count 5 --top 30 --json out.json

The sweep's trace (S1-like, `--count` rank-8 adapters listed in a folder, `--req-rate`
requests/s for `--duration` s) replayed into an engine core in this process, with no HTTP,
under the sweep's host budget (`--max-cpu-loras`): each request is added when its arrival
time has passed, and the engine steps until every one has finished. Adapters are read on
the loader thread, as in the server, so the profile (of the engine thread alone) shows what
the steps, the scheduling, the copies into the pool and the host-RAM bookkeeping cost, and
not the reads themselves (at this process's GIL switch interval, CPython's 5 ms unless
changed; the server's core process switches after 0.2 ms, engine/core/core_process.py).
Reported: requests/s, forward passes, and the `--top` functions by own time. cProfile
slows the Python side, not the kernels: compare two points profiled alike, not with the
sweep's figures.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from pathlib import Path
from typing import Any

from .adapter_tiers import sweep_assets, sweep_trace
from .assets import default_cache_dir
from .metrics import run_metadata
from .trace import generate_trace


def profile(args: argparse.Namespace) -> dict[str, Any]:
    from loraserve import LLM, SamplingParams
    from loraserve.engine.core.request import EngineRequest

    model, folder = sweep_assets(args.count, args.cache_dir)
    trace = generate_trace(sweep_trace(args.count, args.req_rate, args.duration))
    options = {"device": "cpu", "dtype": "float32", "max_cpu_loras": args.max_cpu_loras}
    llm = LLM(str(model), adapter_dir=folder, **options)
    engine = llm.engine
    requests = [
        EngineRequest(
            f"r{r.index}",
            list(r.prompt_token_ids),
            SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True),
            r.adapter,
            adapter_path=None if r.adapter is None else str(folder / r.adapter),
        )
        for r in trace
    ]
    profiler = cProfile.Profile()
    added, start = 0, time.perf_counter()
    profiler.enable()
    while added < len(requests) or engine.has_unfinished_requests():
        while added < len(requests) and trace[added].arrival_s <= time.perf_counter() - start:
            engine.add_request(requests[added])
            added += 1
        if engine.has_unfinished_requests():
            engine.step()
        else:
            time.sleep(0.001)  # the next arrival
    profiler.disable()
    seconds = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    return {
        "count": args.count,
        "requests": len(requests),
        "seconds": round(seconds, 2),
        "req_s": round(len(requests) / seconds, 1),
        "forward_passes": _calls(stats, "forward", "llama.py"),
        "top": _top(stats, args.top),
    }


def _entries(stats: pstats.Stats) -> list[tuple[str, int, float, float]]:
    """(function, calls, own seconds, cumulative seconds) of every profiled function."""
    rows = []
    raw = stats.stats  # type: ignore[attr-defined]
    for (path, line, name), (_, calls, own, cumulative, _) in raw.items():
        where = name if path == "~" else f"{Path(path).name}:{line}({name})"
        rows.append((where, calls, own, cumulative))
    return rows


def _calls(stats: pstats.Stats, name: str, file: str) -> int:
    """Calls of function `name` of `file`."""
    return sum(
        calls
        for where, calls, _, _ in _entries(stats)
        if where.startswith(f"{file}:") and where.endswith(f"({name})")
    )


def _top(stats: pstats.Stats, count: int) -> list[dict[str, Any]]:
    rows = sorted(_entries(stats), key=lambda row: -row[2])[:count]
    return [
        {"function": where, "calls": calls, "own_s": round(own, 3), "cumulative_s": round(cum, 3)}
        for where, calls, own, cum in rows
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="adapters in the folder")
    parser.add_argument("--duration", type=float, default=10.0, help="trace seconds")
    parser.add_argument("--req-rate", type=float, default=200.0, help="requests/s offered")
    parser.add_argument("--max-cpu-loras", type=int, default=256, help="host budget")
    parser.add_argument("--top", type=int, default=20, help="functions listed")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--json", type=Path, help="write the result and the machine here too")
    args = parser.parse_args(argv)
    result = profile(args)
    requests, seconds, rate = result["requests"], result["seconds"], result["req_s"]
    print(f"{requests} requests in {seconds} s ({rate} req/s), {result['forward_passes']} passes")
    print(f"{'own s':>8}{'cum. s':>8}{'calls':>9}  function")
    for row in result["top"]:
        print(
            f"{row['own_s']:>8.3f}{row['cumulative_s']:>8.3f}{row['calls']:>9}  {row['function']}"
        )
    if args.json is not None:
        record = {**run_metadata(), "args": {k: str(v) for k, v in vars(args).items()}}
        args.json.write_text(json.dumps(record | result, indent=2) + "\n")


if __name__ == "__main__":
    main()
