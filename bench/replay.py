"""Replay a trace (bench/trace.py) against any OpenAI-compatible server, in real time.

    python -m bench.replay --trace trace.jsonl --url http://127.0.0.1:8000 --base-model NAME \\
        [--api-key KEY] [--slo-ttft 6] [--output result.json]

Each request is sent at its scheduled arrival, never earlier, whatever happened to
the ones before (an open-loop client: a slow server faces a growing queue, as in
the S-LoRA paper). Each is `POST /v1/completions` with the trace's prompt token ids,
`max_tokens` = its output length, greedy, `ignore_eos` (vLLM's extra, which
loraserve honours) so every system generates exactly as many tokens, and streamed.

The first token's time is that of the first streamed chunk that carries a choice:
not the first chunk with text, because a token may decode to no text yet (part of
a character), and the token was still generated. The number of output tokens is
the final usage chunk's `completion_tokens` (`stream_options.include_usage`), or
the number of chunks with a choice from a server that sends no usage.
Failures (status other than 200, an error event, a stream without `[DONE]`, a
timeout, a dropped connection) are recorded in the request's record, never raised.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from .metrics import RequestRecord, run_metadata, summarize
from .trace import TraceRequest, read_trace

Clock = Callable[[], float]
ERROR_BODY_CHARS = 300
"""How much of an error response's body a record keeps."""


async def replay(
    base_url: str,
    requests: list[TraceRequest],
    *,
    base_model: str,
    api_key: str | None = None,
    timeout_s: float = 600,
) -> tuple[list[RequestRecord], float]:
    """Send every request at its arrival time; (one record per request, duration).

    The duration runs from the first arrival to the last request's end. A request
    not finished `timeout_s` after it was sent is recorded as failed."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # No connection limit: a request waiting for a free connection would be late
    # because of the client, and the point is to measure the server.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, limits=limits, timeout=timeout_s
    ) as client:
        start = time.perf_counter()
        clock: Clock = lambda: time.perf_counter() - start  # noqa: E731
        records = await asyncio.gather(
            *(_send_at(client, request, base_model, clock, timeout_s) for request in requests)
        )
    return list(records), _duration(records)


def _duration(records: list[RequestRecord]) -> float:
    if not records:
        return 0.0
    first_arrival = min(record.arrival_s for record in records)
    last_end = max(record.finish_s or record.arrival_s for record in records)
    return last_end - first_arrival


async def _send_at(
    client: httpx.AsyncClient,
    request: TraceRequest,
    base_model: str,
    clock: Clock,
    timeout_s: float,
) -> RequestRecord:
    """Wait for the request's arrival, send it, record what happened."""
    record = RequestRecord(request.index, request.adapter, request.arrival_s)
    # asyncio.sleep may wake a hair early (the loop's clock resolution): loop until due.
    while (wait := request.arrival_s - clock()) > 0:
        await asyncio.sleep(wait)
    record.sent_s = clock()
    try:
        await asyncio.wait_for(
            _stream(client, _body(request, base_model), record, clock), timeout_s
        )
    except TimeoutError:
        record.error = f"no answer within {timeout_s} s"
    except Exception as error:  # a broken connection or a malformed chunk: this request failed
        record.error = f"{type(error).__name__}: {error}"
    record.finish_s = clock()
    return record


def _body(request: TraceRequest, base_model: str) -> dict[str, Any]:
    return {
        "model": request.adapter or base_model,
        "prompt": request.prompt_token_ids,
        "max_tokens": request.output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def _stream(
    client: httpx.AsyncClient, body: dict[str, Any], record: RequestRecord, clock: Clock
) -> None:
    """POST one streamed completion; fill the record's first token, tokens and error."""
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            record.error = f"HTTP {response.status_code}: {text[:ERROR_BODY_CHARS]}"
            return
        done = False
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments
            payload = line.removeprefix("data:").strip()
            if payload == "[DONE]":
                done = True
                break
            _read_chunk(json.loads(payload), record, clock)
            if record.error is not None:
                return
    if not done:
        record.error = "the stream ended without [DONE]"
    elif record.first_token_s is None:
        record.error = "the stream carried no token"


def _read_chunk(chunk: dict[str, Any], record: RequestRecord, clock: Clock) -> None:
    if "error" in chunk:
        record.error = f"error event: {json.dumps(chunk['error'])[:ERROR_BODY_CHARS]}"
    elif chunk.get("choices"):
        if record.first_token_s is None:
            record.first_token_s = clock()
        record.output_tokens += 1  # a count for servers without usage; the usage chunk wins
    if chunk.get("usage"):
        record.output_tokens = int(chunk["usage"]["completion_tokens"])


def print_summary(summary: dict) -> None:
    """A short table of a summary."""
    print(
        f"requests {summary['requests']}, completed {summary['completed']}, "
        f"errors {summary['errors']}, duration {summary['duration_s']:.1f} s"
    )
    print(
        f"throughput {summary['throughput_req_s']:.2f} req/s, "
        f"{summary['output_tokens_per_s']:.1f} output tokens/s, "
        f"SLO (TTFT <= {summary['slo_ttft_s']} s) {_format(summary['slo_attainment'])}"
    )
    print(f"{'':<8}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for name in ("ttft_s", "tpot_s", "e2e_s"):
        row = summary[name]
        print(
            f"{name:<8}"
            + "".join(f"{_format(row[key]):>10}" for key in ("mean", "p50", "p90", "p99"))
        )
    for message, count in summary["error_messages"].items():
        print(f"error x{count}: {message}")


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    params, requests = read_trace(args.trace)
    records, duration = asyncio.run(
        replay(
            args.url,
            requests,
            base_model=args.base_model,
            api_key=args.api_key,
            timeout_s=args.timeout,
        )
    )
    summary = summarize(records, duration, args.slo_ttft)
    print_summary(summary)
    if args.output:
        result = {
            **run_metadata(),
            "system": "replay",
            "url": args.url,
            "base_model": args.base_model,
            "trace": str(args.trace),
            "params": asdict(params),
            "summary": summary,
        }
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, required=True, help="a JSONL trace of bench/trace.py")
    parser.add_argument(
        "--url", required=True, help="the server's root, e.g. http://127.0.0.1:8000"
    )
    parser.add_argument(
        "--base-model", required=True, help="model name of the requests without adapter"
    )
    parser.add_argument("--api-key", help="sent as `Authorization: Bearer KEY`")
    parser.add_argument("--slo-ttft", type=float, default=6.0, help="TTFT bound of the SLO, s")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="per request, from its send, s"
    )
    parser.add_argument("--output", type=Path, help="write the summary and run metadata as JSON")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
