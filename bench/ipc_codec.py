"""What one step's message costs to cross between the engine core and the front end.

    python -m bench.ipc_codec                     # the table: msgspec (ours) vs pickle
    python -m bench.ipc_codec --requests 64 --output result.json

The message is the `Outputs` of one decode step (engine/core/ipc.py): one `EngineOutput` per
running request, each with one new token, as a step of `--requests` requests sends it
(and, in a second row, with the top-5 logprobs of that token too). Each codec encodes
and decodes it `--repeats` times; the figure is the median time of one round trip
(encode + decode, the CPU both processes spend on it; the socket's copy is the same
for both). Pickle is what `multiprocessing` queues would have used.
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loraserve.engine.core import ipc
from loraserve.engine.core.outputs import EngineOutput, TokenLogprobs

from .metrics import run_metadata


def step_message(requests: int, with_logprobs: bool) -> ipc.Outputs:
    """One decode step's outputs: one new token for each of `requests` requests."""
    outputs = []
    for index in range(requests):
        token = 100 + index
        logprobs = None
        if with_logprobs:
            top = [(token + k, -0.5 * (k + 1)) for k in range(5)]
            logprobs = [TokenLogprobs(token_id=token, logprob=-0.5, rank=1, top_logprobs=top)]
        outputs.append(EngineOutput(f"cmpl-{index:08x}-0", [token], logprobs))
    return ipc.Outputs(outputs)


def round_trip_us(encode: Callable[[Any], bytes], decode: Callable[[bytes], Any], message, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        decode(encode(message))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6, len(encode(message))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    to_front_end = ipc.Codec(ipc.ToFrontEnd)
    codecs = {
        "msgspec": (to_front_end.encode, to_front_end.decode),
        "pickle": (pickle.dumps, pickle.loads),
    }
    rows = []
    print(f"{'codec':8} {'logprobs':>8} {'us/step':>8} {'bytes':>7}")
    for with_logprobs in (False, True):
        message = step_message(args.requests, with_logprobs)
        for name, (encode, decode) in codecs.items():
            micros, size = round_trip_us(encode, decode, message, args.repeats)
            rows.append(dict(codec=name, logprobs=with_logprobs, us_per_step=micros, bytes=size))
            print(f"{name:8} {with_logprobs!s:>8} {micros:8.1f} {size:7d}")
    if args.output:
        result = {**run_metadata(), "args": {"requests": args.requests}, "rows": rows}
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
