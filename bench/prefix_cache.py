"""Prefix caching: TTFT and throughput of a shared system prompt across many adapters, on and off.

    python -m bench.prefix_cache                                     # the table
    python -m bench.prefix_cache --requests 64 --adapters 16 --output result.json

The workload: every request starts with the same system prompt of `--system-tokens`
random tokens (seeded), then its own question of 16..48 tokens, and generates exactly
`--output-tokens` greedy tokens (`ignore_eos`); request i names adapter i mod
`--adapters`, so each adapter computes the system prompt once and its later requests
may reuse it (the same tokens under another adapter share no KV). `--concurrency`
clients each send their next request when their last one ends (a closed loop), over
SSE as chat clients do; TTFT is the time to the first streamed token.

Each run is a fresh `loraserve serve` process on 127.0.0.1 (the CPU benchmark model of
bench/models.py, float32): prefix caching on (the default), or `--no-prefix-caching`.
One short warm-up request (the base model, a prompt sharing nothing) precedes each. The
modes alternate for `--rounds` rounds (on first in even rounds, off first in odd ones),
so that a machine shared with other work weighs on both alike; each mode's TTFTs are
pooled over its runs, its throughput is its requests over its total time. The cache's
own counters are read from /metrics after each run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import time
from pathlib import Path

import httpx

from .assets import default_cache_dir, ensure_assets
from .metrics import describe, run_metadata
from .models import SHAPES
from .servers import loraserve_server
from .trace import adapter_name

QUESTION_RANGE = (16, 48)
MODES = {"caching": [], "no caching": ["--no-prefix-caching"]}


def workload(args: argparse.Namespace, vocab_size: int) -> list[tuple[str, list[int]]]:
    """(adapter name, prompt token ids) of each request, in sending order."""
    rng = random.Random(args.seed)
    system = [rng.randrange(3, vocab_size) for _ in range(args.system_tokens)]
    requests = []
    for index in range(args.requests):
        question = [rng.randrange(3, vocab_size) for _ in range(rng.randint(*QUESTION_RANGE))]
        requests.append((adapter_name(index % args.adapters), system + question))
    return requests


async def _send(client: httpx.AsyncClient, name: str, prompt: list[int], tokens: int) -> float:
    """One streamed completion; returns its TTFT in seconds."""
    body = {
        "model": name,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    start = time.perf_counter()
    ttft = None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if ttft is None and line.startswith("data:") and '"text"' in line:
                ttft = time.perf_counter() - start
    assert ttft is not None, "no token came back"
    return ttft


async def _run(url: str, requests, args: argparse.Namespace) -> tuple[list[float], float]:
    """(TTFT of each request, wall time of all) with `--concurrency` closed-loop clients."""
    queue = list(reversed(requests))
    ttfts: list[float] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        await _send(client, "base", [5, 6, 7, 8], 2)  # warm-up: shares no prefix

        async def worker() -> None:
            while queue:
                name, prompt = queue.pop()
                ttfts.append(await _send(client, name, prompt, args.output_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        return ttfts, time.perf_counter() - start


def _counter(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def run_once(model, adapters, requests, server_args: list[str], args) -> dict:
    """One run on a fresh server: every TTFT, the wall time, the cache's counters."""
    options = ["--device", "cpu", "--dtype", "float32", *server_args]
    with loraserve_server(model, adapters, options) as url:
        ttfts, seconds = asyncio.run(_run(url, requests, args))
        text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        "ttfts": ttfts,
        "seconds": seconds,
        "queries": _counter(text, "vllm:prefix_cache_queries_total"),
        "hits": _counter(text, "vllm:prefix_cache_hits_total"),
    }


def summarize(runs: list[dict], num_requests: int, output_tokens: int) -> dict:
    seconds = sum(run["seconds"] for run in runs)
    queries, hits = sum(run["queries"] for run in runs), sum(run["hits"] for run in runs)
    return {
        "ttft_s": describe([ttft for run in runs for ttft in run["ttfts"]]),
        "seconds_per_run": [run["seconds"] for run in runs],
        "requests_per_s": num_requests * len(runs) / seconds,
        "output_tokens_per_s": num_requests * len(runs) * output_tokens / seconds,
        "prefix_cache_queries": queries,
        "prefix_cache_hits": hits,
        "hit_rate": hits / queries if queries else 0.0,
    }


def print_table(results: dict[str, dict]) -> None:
    print(f"{'mode':<12} {'req/s':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p90':>9} {'hit rate':>9}")
    for mode, result in results.items():
        ttft = result["ttft_s"]
        print(
            f"{mode:<12} {result['requests_per_s']:>7.2f} {result['output_tokens_per_s']:>8.1f} "
            f"{ttft['p50']:>8.3f}s {ttft['p90']:>8.3f}s {result['hit_rate']:>9.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    model, adapters = ensure_assets("cpu", (args.rank,), args.adapters, args.cache_dir, "float32")
    requests = workload(args, SHAPES["cpu"].vocab_size)
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for number in range(args.rounds):
        for mode in list(MODES)[:: 1 if number % 2 == 0 else -1]:
            run = run_once(model, adapters, requests, MODES[mode], args)
            runs[mode].append(run)
            print(f"round {number} {mode}: {run['seconds']:.2f} s", flush=True)
    results = {
        mode: summarize(mode_runs, len(requests), args.output_tokens)
        for mode, mode_runs in runs.items()
    }
    print_table(results)
    if args.output:
        result = {**run_metadata(), "args": _jsonable(vars(args)), "results": results}
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")


def _jsonable(values: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--system-tokens", type=int, default=256)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8, help="rank of every adapter")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each mode, alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--output", type=Path)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
