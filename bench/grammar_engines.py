"""How the structured-output engines compare on one vocabulary: what engine/sampling/structured.py
chose llguidance on.

    pip install xgrammar   # optional: compared when importable (it imports torch and transformers)
    python -m bench.grammar_engines --tokenizer MODEL_DIR [--batch 64]

For each engine: the cost of preparing the tokenizer, of compiling one JSON schema (a
matcher for it), of its import, and per step at `--batch` rows the median and worst
time to fill every row's mask while the rows walk through one valid (compact) instance
of the schema. Prints one line per figure.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "[0-9]{5}"},
            },
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
INSTANCE = {
    "name": "Alice Smith",
    "age": 42,
    "tags": ["a", "bb"],
    "address": {"city": "Paris", "zip": "75001"},
}


def timed(work: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = work()
    return result, (time.perf_counter() - start) * 1e3


def llguidance_figures(
    tokenizer_json: str, vocab: int, eos: int, ids: list[int], batch: int
) -> dict[str, float]:
    figures: dict[str, float] = {}
    llguidance, figures["import_ms"] = timed(lambda: importlib.import_module("llguidance"))
    llg_numpy = importlib.import_module("llguidance.numpy")
    tokenizer, figures["tokenizer_ms"] = timed(
        lambda: llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=eos)
    )
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(SCHEMA), overrides={"whitespace_flexible": False}
    )
    _, figures["compile_ms"] = timed(lambda: llguidance.LLMatcher(tokenizer, grammar, log_level=0))
    matchers = [llguidance.LLMatcher(tokenizer, grammar, log_level=0) for _ in range(batch)]
    executor, bitmask = llguidance.LLExecutor(), llg_numpy.allocate_token_bitmask(batch, vocab)
    steps = []
    for token in ids:
        _, ms = timed(
            lambda: llg_numpy.fill_next_token_bitmask_par(
                executor, [(m, i) for i, m in enumerate(matchers)], bitmask
            )
        )
        steps.append(ms)
        for matcher in matchers:
            assert matcher.consume_token(token), matcher.get_error()
    figures["mask_median_ms"], figures["mask_worst_ms"] = statistics.median(steps), max(steps)
    return figures


def xgrammar_figures(
    tokenizer_json: str, vocab: int, eos: int, ids: list[int], batch: int
) -> dict[str, float]:
    from tokenizers import Tokenizer as RustTokenizer

    figures: dict[str, float] = {}
    xgr, figures["import_ms"] = timed(lambda: importlib.import_module("xgrammar"))
    backend = RustTokenizer.from_str(tokenizer_json)

    def prepare() -> object:
        encoded = [backend.id_to_token(i) or "" for i in range(vocab)]
        info = xgr.TokenizerInfo(
            encoded, vocab_type=xgr.VocabType.BYTE_LEVEL, vocab_size=vocab, stop_token_ids=[eos]
        )
        return xgr.GrammarCompiler(info)

    compiler, figures["tokenizer_ms"] = timed(prepare)
    compiled, figures["compile_ms"] = timed(
        lambda: compiler.compile_json_schema(
            json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":")
        )
    )
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
    bitmask = xgr.allocate_token_bitmask(batch, vocab)
    steps = []
    for token in ids:

        def fill() -> None:
            for row, matcher in enumerate(matchers):
                matcher.fill_next_token_bitmask(bitmask, row)

        steps.append(timed(fill)[1])
        for matcher in matchers:
            assert matcher.accept_token(token)
    figures["mask_median_ms"], figures["mask_worst_ms"] = statistics.median(steps), max(steps)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="a model folder with tokenizer.json")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    from loraserve.models.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(args.tokenizer)
    tokenizer_json, vocab = tokenizer.backend.to_str(), tokenizer.vocab_size
    eos = tokenizer.eos_token_ids[0]
    ids = tokenizer.encode(json.dumps(INSTANCE, separators=(",", ":")), add_special_tokens=False)
    print(f"vocabulary {vocab}, instance of {len(ids)} tokens, batch {args.batch}")
    engines = {"llguidance": llguidance_figures, "xgrammar": xgrammar_figures}
    for name, figures_of in engines.items():
        try:
            figures = figures_of(tokenizer_json, vocab, eos, ids, args.batch)
        except ImportError as error:
            print(f"{name}: not installed ({error})", file=sys.stderr)
            continue
        print(name, ", ".join(f"{key} {value:.3f}" for key, value in figures.items()))


if __name__ == "__main__":
    main()
