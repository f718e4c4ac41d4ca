"""The same requests offline (`LLM.generate`) and through the HTTP server, on one adapter and on many.

    python -m bench.server_vs_offline                       # the table, cpu-s2 shapes
    python -m bench.server_vs_offline --requests 64 --output-tokens 32 --output result.json

The workload is the held-out one of issue 11: the preset's model, `--requests` prompts
of 16..64 tokens (seeded), each generating exactly `--output-tokens` greedy tokens
(`ignore_eos`), all queued at once. Two placements of the same requests:
- single: every request on adapter 0 (rank 64 in cpu-s2, the highest);
- mixed: request i on adapter i mod `--adapters` (ranks 64/32/16/8 in turn).

Offline: one `LLM.generate` over all of them, in this process. Server: a real
`loraserve serve` process on 127.0.0.1 and all requests sent at once, each on its
own connection, streamed (SSE, as clients use it) and, separately, not streamed.
The client writes HTTP/1.1 by hand and only counts events, so that it takes as
little of the machine's CPU as possible from the server it measures. Each figure is
the median wall time of `--repeats` runs after one warm-up run; the ratios are of
throughputs (time of the reference over time of the other).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path

from .assets import default_cache_dir, ensure_assets
from .metrics import run_metadata
from .models import SHAPES
from .servers import loraserve_server
from .trace import PRESETS, adapter_name

PROMPT_RANGE = (16, 64)


def workload(requests: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [rng.randrange(3, vocab_size) for _ in range(rng.randint(*PROMPT_RANGE))]
        for _ in range(requests)
    ]


def placement(kind: str, requests: int, num_adapters: int) -> list[str]:
    if kind == "single":
        return [adapter_name(0)] * requests
    return [adapter_name(index % num_adapters) for index in range(requests)]


def time_offline(llm, prompts, names, output_tokens: int, repeats: int) -> float:
    from loraserve import SamplingParams

    params = SamplingParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, adapter=names)
        times.append(time.perf_counter() - start)
        assert all(len(output.token_ids) == output_tokens for output in outputs)
    return statistics.median(times[1:])


async def _send(url: str, prompt, name, output_tokens: int, stream: bool) -> int:
    """One request on its own connection, HTTP/1.1 by hand: the body is sent, the answer
    read to the end (the server closes the connection) and only its `data:` events
    counted. A full client (httpx) takes several times the CPU per request and per
    event, and it shares the machine's cores with the server it measures."""
    body = json.dumps(
        {
            "model": name,
            "prompt": prompt,
            "max_tokens": output_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": stream,
        }
    ).encode()
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    answer = await reader.read()  # to the end: the server closes after the answer
    writer.close()
    if not answer.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(answer[:300].decode(errors="replace"))
    return answer.count(b"data: ") if stream else 1


async def _server_run(url: str, prompts, names, output_tokens: int, stream: bool) -> float:
    start = time.perf_counter()
    await asyncio.gather(
        *(_send(url, p, n, output_tokens, stream) for p, n in zip(prompts, names, strict=True))
    )
    return time.perf_counter() - start


def time_server(url: str, prompts, names, output_tokens: int, stream: bool, repeats: int) -> float:
    times = [
        asyncio.run(_server_run(url, prompts, names, output_tokens, stream))
        for _ in range(repeats + 1)
    ]
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    from loraserve import LLM

    preset = PRESETS[args.preset]
    model, adapters = ensure_assets(
        preset.model, preset.ranks, args.adapters, args.cache_dir, "float32"
    )
    prompts = workload(args.requests, SHAPES[preset.model].vocab_size, args.seed)
    kinds = {kind: placement(kind, args.requests, args.adapters) for kind in ("single", "mixed")}
    seconds: dict[str, float] = {}
    llm = LLM(str(model), adapters, device="cpu", dtype="float32")
    for kind, names in kinds.items():
        seconds[f"offline {kind}"] = time_offline(
            llm, prompts, names, args.output_tokens, args.repeats
        )
        print(f"offline {kind}: {seconds[f'offline {kind}']:.3f} s", flush=True)
    del llm
    server_args = ["--device", "cpu", "--dtype", "float32", *args.server_arg]
    with loraserve_server(model, adapters, server_args) as url:
        for stream in (True, False):
            for kind, names in kinds.items():
                key = f"server {'stream' if stream else 'plain'} {kind}"
                seconds[key] = time_server(
                    url, prompts, names, args.output_tokens, stream, args.repeats
                )
                print(f"{key}: {seconds[key]:.3f} s", flush=True)
    ratios = _ratios(seconds)
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    if args.output:
        result = {
            **run_metadata(),
            "preset": args.preset,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "seconds": seconds,
            "ratios": ratios,
        }
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")


def _ratios(seconds: dict[str, float]) -> dict[str, float]:
    """Throughput ratios: mixed over single, server over offline."""
    ratios = {}
    for where in ("offline", "server stream", "server plain"):
        ratios[f"{where}: mixed / single"] = seconds[f"{where} single"] / seconds[f"{where} mixed"]
    for mode in ("stream", "plain"):
        for kind in ("single", "mixed"):
            ratios[f"server {mode} / offline, {kind}"] = (
                seconds[f"offline {kind}"] / seconds[f"server {mode} {kind}"]
            )
    return ratios


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-s2")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=64, help="adapters of the mixed placement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra `loraserve serve` argument (repeatable), e.g. --server-arg=--cpu-threads=2",
    )
    parser.add_argument("--output", type=Path)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
