"""How much one hostile request hurts everyone else: other streams' worst gap, /health's latency.

    python -m bench.hostile                          # every case, one server each
    python -m bench.hostile --case prompt-5mib --output result.json

For each case: start `loraserve serve` (its default limits, unless `--server-arg` says
otherwise) on the CPU benchmark model (bench/models.py's
`cpu` shape, random weights, word-level tokenizer) on a free port of 127.0.0.1, run
`--streams` background streams (greedy, `ignore_eos`, long) and a /health poller, wait
until every stream has produced tokens, then send the hostile request once and keep
watching for `--settle` seconds after its answer. The figures are the background
streams' worst gap between two chunks and /health's worst latency, before the hostile
request (baseline) and from its sending to `--settle` seconds after its answer.

Cases (what issue 10 found): `prompt-5mib` (a 5 MiB text prompt), `token-ids-14mb` (a
14 MB JSON list of token ids), `n-20000` (n=20000 completions of a short prompt); issue 25's
`n-x-prompts` (256 prompts with n=128: each limit passed alone, 32,768 sequences together;
target: a 4xx at once, before anything is queued); issue 24's
grammar path: `grammar-chain-3000` (the Lark chain that killed the server), `grammar-chain-900`
(within the limits, too deep for the checking child's stack), `choice-600kb`, and two
constraints at the limits that the core compiles between steps (`choice-at-limit`,
`schema-at-byte-limit`); target: a worst gap within 2x the baseline's.
The client runs in this process: its threads share this process's GIL, not the server's.

`tenant-timing` (bench/tenant_probe.py, three servers of its own): the prefix cache as a
timing channel between tenants, a 660-token prompt sent by tenant A then by tenant B, open,
isolated by `--api-keys` and shared by a `prefix_cache_group`; TTFT and the hit counters.

`tokenizer` (in-process, no server): the event loop's worst stall while the server's
prompt code tokenizes a 5 MiB text and renders a 5 MiB chat message in its worker
thread, against tokenizing on the loop itself.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loraserve.errors import InvalidRequestError
from loraserve.models.tokenizer import Tokenizer
from loraserve.server.prompts import PromptBuilder

from .assets import default_cache_dir, ensure_assets
from .metrics import run_metadata
from .servers import BASE_MODEL_NAME, loraserve_server
from .tenant_probe import run as tenant_timing

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
"""The benchmark model has no chat template; this one renders every message in full."""

RESULTS = Path(__file__).parent / "results"
HEALTH_INTERVAL_S = 0.05
HEALTH_TIMEOUT_S = 30.0


def _prompt_5mib() -> dict[str, Any]:
    words = "the quick brown fox jumps over the lazy dog "
    text = (words * (5 * 2**20 // len(words) + 1))[: 5 * 2**20]
    return {"model": BASE_MODEL_NAME, "prompt": text, "max_tokens": 1}


def _token_ids_14mb() -> dict[str, Any]:
    # "12345," is 6 bytes of JSON: 2.4 M ids make 14 MB (the id is out of the vocabulary,
    # which only a check after the length check would notice).
    return {"model": BASE_MODEL_NAME, "prompt": [12345] * 2_400_000, "max_tokens": 1}


def _n_20000() -> dict[str, Any]:
    return {"model": BASE_MODEL_NAME, "prompt": "hello", "n": 20000, "max_tokens": 1}


def _n_times_prompts(num_prompts: int, n: int) -> dict[str, Any]:
    """Issue 25: many prompts times n, each within its own limit, 32,768 sequences together."""
    prompts = [f"hello {index}" for index in range(num_prompts)]
    return {"model": BASE_MODEL_NAME, "prompt": prompts, "n": n, "max_tokens": 1}


def _grammar(guided: dict[str, Any]) -> dict[str, Any]:
    return {"model": BASE_MODEL_NAME, "prompt": "hello", "max_tokens": 8, **guided}


def _lark_chain(num_rules: int) -> dict[str, Any]:
    """Issue 24's R1: Lark rules each referring to the next (3,000 killed the server)."""
    rules = "\n".join(f'r{i}: "a" r{i + 1} | "b"' for i in range(num_rules))
    return _grammar({"guided_grammar": f'start: r0\n{rules}\nr{num_rules}: "z"'})


def _choices(count: int, width: int) -> dict[str, Any]:
    return _grammar({"guided_choice": [f"{i:0{width}d}" for i in range(count)]})


def _schema_at_byte_limit() -> dict[str, Any]:
    """A `tool_choice: required`-like schema of ~60 KiB (just under max_grammar_bytes) and
    128 branches (max_schema_branches): the engine core compiles it between two steps."""
    items = []
    for i in range(128):
        fields = {f"field_{i}_{j}_{'x' * 28}": {"type": "string"} for j in range(6)}
        parameters = {"type": "object", "properties": fields}
        items.append(
            {
                "type": "object",
                "properties": {"name": {"const": f"tool_{i}"}, "parameters": parameters},
            }
        )
    return _grammar({"guided_json": {"type": "array", "items": {"anyOf": items}}})


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    "prompt-5mib": _prompt_5mib,
    "token-ids-14mb": _token_ids_14mb,
    "n-20000": _n_20000,
    # issue 25: the sequences of one request are prompts x n (x best_of), bounded together
    "n-x-prompts": lambda: _n_times_prompts(256, 128),
    # issue 24: the grammar path
    "grammar-chain-3000": lambda: _lark_chain(3000),  # refused by max_grammar_rules
    "grammar-chain-900": lambda: _lark_chain(900),  # within the limits: its checker dies
    "choice-600kb": lambda: _choices(50_000, 10),  # refused by max_guided_choices
    "choice-at-limit": lambda: _choices(1024, 60),  # compiled by the checker and the core
    "schema-at-byte-limit": _schema_at_byte_limit,
}


@dataclass
class Watch:
    """Timestamps of the background streams' chunks and the /health probes."""

    chunks: list[list[float]] = field(default_factory=list)
    """Chunk arrival times, one list per stream (a stream that ends is followed by another)."""
    health: list[tuple[float, float, int]] = field(default_factory=list)
    """(sent, latency s, status; 0 = no answer)."""
    stop: threading.Event = field(default_factory=threading.Event)

    def stream(self, url: str, body: dict[str, Any]) -> None:
        """Greedy streamed completions of `body`, one after another until `stop`,
        recording when each chunk arrives."""
        body = {**body, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=None) as http:
            while not self.stop.is_set():
                times: list[float] = []
                self.chunks.append(times)
                with http.stream("POST", f"{url}/v1/completions", json=body) as response:
                    for line in response.iter_lines():
                        if line.startswith("data: {"):
                            times.append(time.perf_counter())
                        if self.stop.is_set():
                            return

    def worst_gap(self, start: float, end: float) -> float:
        """The longest wait for a stream's next chunk that overlaps [start, end]."""
        worst = 0.0
        for times in self.chunks:
            for before, after in itertools.pairwise(times):
                if after >= start and before <= end:
                    worst = max(worst, after - before)
        return worst

    def worst_health(self, start: float, end: float) -> float:
        window = [latency for sent, latency, _ in self.health if start <= sent <= end]
        return max(window, default=0.0)


def _stream(url: str, watch: Watch, index: int) -> None:
    body = {"model": BASE_MODEL_NAME, "prompt": f"stream {index}", "max_tokens": None}
    watch.stream(url, body)


def _poll_health(url: str, watch: Watch) -> None:
    with httpx.Client(timeout=HEALTH_TIMEOUT_S) as http:
        while not watch.stop.is_set():
            sent = time.perf_counter()
            try:
                status = http.get(f"{url}/health").status_code
            except httpx.HTTPError:
                status = 0
            watch.health.append((sent, time.perf_counter() - sent, status))
            time.sleep(HEALTH_INTERVAL_S)


def run_case(name: str, url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Background load, the hostile request, the figures."""
    body = json.dumps(CASES[name](), separators=(",", ":")).encode()  # built before the clock
    watch = Watch()
    threads = [
        threading.Thread(target=_stream, args=(url, watch, i), daemon=True)
        for i in range(args.streams)
    ]
    threads.append(threading.Thread(target=_poll_health, args=(url, watch), daemon=True))
    for thread in threads:
        thread.start()
    while len(watch.chunks) < args.streams or not all(len(t) >= 5 for t in watch.chunks):
        time.sleep(0.05)
    warm = time.perf_counter()
    time.sleep(args.baseline)
    sent = time.perf_counter()
    with httpx.Client(timeout=300) as http:
        response = http.post(
            f"{url}/v1/completions", content=body, headers={"content-type": "application/json"}
        )
    answered = time.perf_counter()
    time.sleep(args.settle)
    end = time.perf_counter()
    watch.stop.set()
    return {
        "case": name,
        "body_bytes": len(body),
        "status": response.status_code,
        "answer": response.text[:300],
        "answer_seconds": round(answered - sent, 3),
        "baseline_worst_gap_s": round(watch.worst_gap(warm, sent), 3),
        "worst_gap_s": round(watch.worst_gap(sent, end), 3),
        "baseline_worst_health_s": round(watch.worst_health(warm, sent), 3),
        "worst_health_s": round(watch.worst_health(sent, end), 3),
        "health_not_200": sum(1 for s, _, code in watch.health if s >= sent and code != 200),
    }


async def _loop_stall(work: Callable[[], Awaitable[Any]]) -> tuple[float, float, str]:
    """(worst gap between 1 ms ticks of the event loop, seconds, outcome) while `work` runs."""
    worst, done = 0.0, asyncio.Event()

    async def tick() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst, last = max(worst, now - last), now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.05)
    start = time.perf_counter()
    try:
        await work()
        outcome = "accepted"
    except InvalidRequestError as error:
        outcome = str(error)[:120]
    elapsed = time.perf_counter() - start
    done.set()
    await ticker
    return worst, elapsed, outcome


def tokenizer_stalls(model: Path) -> list[dict[str, Any]]:
    """The event loop's worst stall while the server's prompt code tokenizes a 5 MiB text
    and renders a 5 MiB chat message (in-process, with the character bound lifted, as for
    a long-context model whose bound does not refuse 5 MiB)."""
    tokenizer = Tokenizer.from_folder(model)
    builder = PromptBuilder(tokenizer, max_model_len=1024)
    builder.max_prompt_chars = 2**30
    tokenizer.chat_templates["default"] = CHAT_TEMPLATE
    text = _prompt_5mib()["prompt"]
    messages = [{"role": "user", "content": text}]
    cases = {
        "tokenize-5mib-in-worker": lambda: builder.completion_prompts(text),
        "chat-5mib-in-worker": lambda: builder.chat_prompt(messages),
        "tokenize-5mib-on-loop (for comparison)": lambda: _on_loop(tokenizer, text),
    }
    results = []
    for name, work in cases.items():
        worst, elapsed, outcome = asyncio.run(_loop_stall(work))
        results.append(
            {
                "case": name,
                "loop_worst_gap_s": round(worst, 4),
                "seconds": round(elapsed, 3),
                "outcome": outcome,
            }
        )
    return results


async def _on_loop(tokenizer: Tokenizer, text: str) -> None:
    tokenizer.encode(text)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    model, _ = ensure_assets("cpu", (8,), 0, args.cache_dir, "float32")
    server_args = ["--device", "cpu", *args.server_arg]
    results = []
    for name in CASES if args.case == "all" else [c for c in [args.case] if c in CASES]:
        with loraserve_server(model, {}, server_args) as url:
            result = run_case(name, url, args)
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.case in ("all", "tenant-timing"):
        for result in tenant_timing(model, server_args):
            print(json.dumps(result), flush=True)
            results.append(result)
    if args.case in ("all", "tokenizer"):
        for result in tokenizer_stalls(model):
            print(json.dumps(result), flush=True)
            results.append(result)
    output = args.output or RESULTS / f"{datetime.date.today().isoformat()}-hostile.json"
    record = {**run_metadata(), "args": {k: str(v) for k, v in vars(args).items()}}
    output.write_text(json.dumps({**record, "results": results}, indent=2) + "\n")
    print(f"wrote {output}")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--case", choices=["all", *CASES, "tenant-timing", "tokenizer"], default="all"
    )
    parser.add_argument("--streams", type=int, default=4, help="background streams")
    parser.add_argument("--baseline", type=float, default=2.0, help="seconds watched before")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds watched after")
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra `loraserve serve` argument (repeatable), e.g. --server-arg=--max-n=100000",
    )
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--output", type=Path)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
