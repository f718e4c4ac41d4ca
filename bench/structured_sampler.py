"""Sampler time per step with 0, 1 and all rows of a batch under structured output.

    python -m bench.structured_sampler --tokenizer MODEL_DIR [--batch 64] [--steps 100]

For each case, every step: the grammar masks of the constrained rows are filled (what
the runner does in a thread while the forward pass runs: `mask fill`), then the sampler
picks a token per row from random logits with those masks applied (`sample`: what the
step waits for), and each grammar advances by its row's token (the core's postprocess:
`advance`). A grammar that completes starts again. The schema is a small object with a
string, an integer, an enum and a list, in flexible bounded whitespace. Greedy rows; the
vocabulary is the tokenizer's (its masks depend on the token strings). Prints a table
and writes JSON next to the other results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from loraserve.engine.core.sampling_params import SamplingParams
from loraserve.engine.sampling.constraints import GrammarMasks
from loraserve.engine.sampling.sampler import SequenceTokens, sample
from loraserve.engine.sampling.structured import GrammarCompiler, StructuredOutputs
from loraserve.models.tokenizer import Tokenizer

from .metrics import run_metadata

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "kind", "tags"],
    "additionalProperties": False,
}


def run_case(
    compiler: GrammarCompiler, vocab_size: int, batch: int, constrained: int, steps: int
) -> dict[str, float]:
    """Median milliseconds per step of mask fill, sample and advance."""
    constraint = StructuredOutputs(json=SCHEMA)
    grammars = [compiler.grammar_for(constraint) for _ in range(constrained)]
    params = [SamplingParams(temperature=0.0, max_tokens=None)] * batch
    histories = [SequenceTokens([1], []) for _ in range(batch)]
    generator = torch.Generator().manual_seed(0)
    timings: dict[str, list[float]] = {"mask_fill_ms": [], "sample_ms": [], "advance_ms": []}
    for _ in range(steps):
        logits = torch.randn(batch, vocab_size, generator=generator)  # [batch, vocab]
        start = time.perf_counter()
        masks = None
        if grammars:
            bitmask = torch.from_numpy(compiler.fill_masks(grammars))
            masks = GrammarMasks(list(range(constrained)), bitmask)
        filled = time.perf_counter()
        output = sample(logits, params, histories, [None] * batch, (), masks)
        sampled = time.perf_counter()
        for row, grammar in enumerate(grammars):
            assert grammar.accept(output.token_ids[row]), grammar.error
            if grammar.finished:
                grammars[row] = compiler.grammar_for(constraint)
        advanced = time.perf_counter()
        timings["mask_fill_ms"].append((filled - start) * 1e3)
        timings["sample_ms"].append((sampled - filled) * 1e3)
        timings["advance_ms"].append((advanced - sampled) * 1e3)
    return {name: round(statistics.median(values), 3) for name, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="a model folder with tokenizer.json")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--output", default="bench/results")
    args = parser.parse_args()
    tokenizer = Tokenizer.from_folder(args.tokenizer)
    vocab_size = tokenizer.vocab_size
    compiler = GrammarCompiler(tokenizer.backend.to_str(), vocab_size, tokenizer.eos_token_ids)
    rows = {}
    for constrained in (0, 1, args.batch):
        rows[constrained] = run_case(compiler, vocab_size, args.batch, constrained, args.steps)
        print(f"{constrained:>3} of {args.batch} rows constrained: {rows[constrained]}", flush=True)
    result = {
        **run_metadata(),
        "benchmark": "structured_sampler",
        "torch_threads": torch.get_num_threads(),
        "tokenizer": str(args.tokenizer),
        "vocab_size": vocab_size,
        "batch": args.batch,
        "steps": args.steps,
        "median_ms_per_step": {str(count): row for count, row in rows.items()},
    }
    out = Path(args.output) / f"{date.today().isoformat()}-structured-sampler.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
