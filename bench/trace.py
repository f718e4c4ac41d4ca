"""S-LoRA's synthetic workload, drawn once into a reproducible JSONL trace.

The workload of the S-LoRA paper (Sheng et al., 2023, section 7 and its
`benchmarks/trace.py`): `num_adapters` adapters whose popularity follows a power
law, arrivals of a gamma renewal process of rate `req_rate` whose gaps have
coefficient of variation `cv` (cv = 1 is Poisson, larger is burstier), and prompt
and output lengths uniform in a range. A request carries prompt *token ids*, so
no tokenizer is involved and every system replaying the trace sees the same tokens.

    python -m bench.trace --preset cpu-s2 --output trace.jsonl
    python -m bench.trace --preset 7b-s1 --num-adapters 100 --req-rate 10 --output t.jsonl

Each quantity is drawn from its own child stream of `default_rng(seed)`, so
changing `num_adapters` or `alpha` changes which adapters are named and nothing
else (an adapter sweep runs the same arrivals and lengths at every point), and a
longer `duration` extends a shorter trace rather than reshuffling it.

The file: line 1 is `{"params": {...}}`, then one request per line.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

FIRST_PROMPT_TOKEN = 3
"""Smallest prompt token id: 0-2 are <unk>, <s>, </s> in bench/models.py's
vocabularies (and Llama-2's), and a benchmark prompt holds no special token."""

GAP_CHUNK = 1024
"""Gaps are drawn this many at a time until the duration is covered; a fixed size
(not one derived from the duration) keeps shorter traces prefixes of longer ones."""


@dataclass(frozen=True)
class TraceParams:
    """Everything that determines a trace: the same params give the same requests."""

    num_adapters: int
    """Adapters named by requests; 0 = every request uses the base model."""
    alpha: float
    """Popularity: adapter index = floor(num_adapters * X), X ~ power(alpha), i.e.
    P(index < k) = (k / num_adapters) ** alpha; 1 is uniform, smaller is more skewed."""
    req_rate: float
    """Mean arrival rate, requests per second."""
    cv: float
    """Coefficient of variation of the gaps between arrivals (gamma); 1 is Poisson."""
    duration: float
    """Arrivals fall in [0, duration) seconds."""
    input_range: tuple[int, int]
    """Prompt lengths in tokens, uniform, both ends included."""
    output_range: tuple[int, int]
    """Output lengths in tokens, uniform, both ends included."""
    seed: int
    vocab_size: int
    """Prompt token ids are uniform in [FIRST_PROMPT_TOKEN, vocab_size)."""

    def __post_init__(self) -> None:
        positive = {"alpha": self.alpha, "req_rate": self.req_rate, "cv": self.cv}
        for name, value in {**positive, "duration": self.duration}.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.num_adapters < 0 or self.seed < 0:
            raise ValueError(
                f"num_adapters and seed must be >= 0, got {self.num_adapters}, {self.seed}"
            )
        for name, (low, high) in (
            ("input_range", self.input_range),
            ("output_range", self.output_range),
        ):
            if not 1 <= low <= high:
                raise ValueError(f"{name} must satisfy 1 <= low <= high, got ({low}, {high})")
        if self.vocab_size <= FIRST_PROMPT_TOKEN:
            raise ValueError(f"vocab_size must be > {FIRST_PROMPT_TOKEN}, got {self.vocab_size}")


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace."""

    index: int
    arrival_s: float
    """Scheduled arrival, seconds from the start of the run."""
    adapter: str | None
    """Adapter name (`adapter_name(i)`), or None for the base model alone (as the engine's
    and the server's `adapter` / `model` say it)."""
    prompt_token_ids: list[int]
    output_len: int
    """Tokens to generate; replayed with `ignore_eos` so exactly this many come back."""


def adapter_name(index: int) -> str:
    """The name of adapter `index`, as the benchmark registers it: `lora-0007`."""
    return f"lora-{index:04d}"


def generate_trace(params: TraceParams) -> list[TraceRequest]:
    """The requests of `params`, in arrival order; deterministic in `params`."""
    arrival_rng, adapter_rng, input_rng, output_rng, token_rng = np.random.default_rng(
        params.seed
    ).spawn(5)
    arrivals = _arrival_times(params, arrival_rng)
    count = len(arrivals)
    adapters = _adapter_indices(params, adapter_rng, count)
    input_lens = input_rng.integers(*params.input_range, size=count, endpoint=True)
    output_lens = output_rng.integers(*params.output_range, size=count, endpoint=True)
    tokens = token_rng.integers(FIRST_PROMPT_TOKEN, params.vocab_size, size=int(input_lens.sum()))
    prompts = np.split(tokens, np.cumsum(input_lens)[:-1]) if count else []
    return [
        TraceRequest(
            index=index,
            arrival_s=float(arrivals[index]),
            adapter=None if adapters is None else adapter_name(int(adapters[index])),
            prompt_token_ids=prompts[index].tolist(),
            output_len=int(output_lens[index]),
        )
        for index in range(count)
    ]


def _arrival_times(params: TraceParams, rng: np.random.Generator) -> np.ndarray:
    """Cumulative gamma gaps below the duration (the first arrival is one gap in)."""
    shape, scale = 1.0 / params.cv**2, params.cv**2 / params.req_rate  # mean 1/rate, CV cv
    gaps: list[np.ndarray] = []
    total = 0.0
    while total < params.duration:
        chunk = rng.gamma(shape, scale, size=GAP_CHUNK)
        gaps.append(chunk)
        total += float(chunk.sum())
    arrivals = np.cumsum(np.concatenate(gaps))
    return arrivals[arrivals < params.duration]


def _adapter_indices(
    params: TraceParams, rng: np.random.Generator, count: int
) -> np.ndarray | None:
    """Power-law adapter indices in [0, num_adapters), or None when there are no adapters."""
    if params.num_adapters == 0:
        return None
    indices = np.floor(params.num_adapters * rng.power(params.alpha, size=count))
    return np.minimum(indices, params.num_adapters - 1).astype(np.int64)  # X = 1 has probability 0


def write_trace(path: str | Path, params: TraceParams, requests: list[TraceRequest]) -> None:
    """Line 1: `{"params": {...}}`; then one request object per line."""
    with open(path, "w", encoding="utf-8") as file:
        file.write(json.dumps({"params": asdict(params)}) + "\n")
        for request in requests:
            file.write(json.dumps(asdict(request), separators=(",", ":")) + "\n")


def read_trace(path: str | Path) -> tuple[TraceParams, list[TraceRequest]]:
    """What `write_trace` wrote."""
    lines = _nonempty_lines(path)
    header = json.loads(next(lines))["params"]
    header["input_range"] = tuple(header["input_range"])
    header["output_range"] = tuple(header["output_range"])
    params = TraceParams(**header)
    return params, [TraceRequest(**json.loads(line)) for line in lines]


def _nonempty_lines(path: str | Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as file:
        for line in file:
            if line.strip():
                yield line


@dataclass(frozen=True)
class Preset:
    """A named benchmark setting: model shape, adapter ranks and workload."""

    name: str
    description: str
    model: str
    """A shape of bench/models.py: `cpu`, `llama-2-7b` or `llama-3-8b` (random weights)."""
    ranks: tuple[int, ...]
    """Adapter i has rank ranks[i % len(ranks)]."""
    trace: TraceParams


# The S-LoRA paper's Table 3 settings (its benchmarks/exp_suite.py, suite "a100-80-table"):
# S1 = Llama-7B with rank-8 adapters, S2 = Llama-7B with ranks 64/32/16/8; n up to 2000,
# alpha 1, 10 req/s, cv 1, 2 minutes, prompts and outputs of 8..512 tokens. (S3/S4 are
# Llama-13B, a shape bench/models.py does not build.) 7b-s2 stops at 200 adapters, where
# the paper's S2 adapter sweep (suite "a100-80-S2-num-adapter") stops: a q/k/v/o adapter
# of Llama-2-7B takes ~2.1 MB per unit of rank in bf16, so 2000 of 7b-s1's rank 8 are
# ~34 GB on disk, and 2000 of mean rank 30 would be ~126 GB. The cpu- presets scale the
# workload to the CPU model: shorter sequences, a rate a 2-core run serves in a minute or two.
_PAPER_TRACE = TraceParams(
    num_adapters=2000,
    alpha=1.0,
    req_rate=10.0,
    cv=1.0,
    duration=120.0,
    input_range=(8, 512),
    output_range=(8, 512),
    seed=42,
    vocab_size=32000,
)
# The CPU rate is above what either system serves on 2 cores (loraserve ~40-50 req/s),
# so both run saturated and throughput is each one's capacity, as in the paper's tables.
_CPU_TRACE = replace(
    _PAPER_TRACE,
    num_adapters=64,
    req_rate=80.0,
    duration=10.0,
    input_range=(8, 64),
    output_range=(8, 64),
    vocab_size=1000,
)
PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "cpu-s1",
            "S1 on the CPU model: 32 rank-8 adapters, uniform",
            "cpu",
            (8,),
            replace(_CPU_TRACE, num_adapters=32),
        ),
        Preset(
            "cpu-s2",
            "S2 on the CPU model: 64 adapters of ranks 64/32/16/8, uniform",
            "cpu",
            (64, 32, 16, 8),
            _CPU_TRACE,
        ),
        Preset(
            "7b-s1",
            "S-LoRA S1: Llama-2-7B shape, 2000 rank-8 adapters, 10 req/s",
            "llama-2-7b",
            (8,),
            _PAPER_TRACE,
        ),
        Preset(
            "7b-s2",
            "S-LoRA S2: Llama-2-7B shape, ranks 64/32/16/8, 10 req/s",
            "llama-2-7b",
            (64, 32, 16, 8),
            replace(_PAPER_TRACE, num_adapters=200),
        ),
    )
}


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    preset = PRESETS[args.preset]
    overrides = {
        name: getattr(args, name)
        for name in ("num_adapters", "alpha", "req_rate", "cv", "duration", "seed")
    }
    params = replace(
        preset.trace, **{name: value for name, value in overrides.items() if value is not None}
    )
    requests = generate_trace(params)
    write_trace(args.output, params, requests)
    adapters = {request.adapter for request in requests}
    print(f"wrote {args.output}: {len(requests)} requests, {len(adapters)} distinct adapters")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-s2")
    parser.add_argument("--num-adapters", type=int, help="default: the preset's")
    parser.add_argument("--alpha", type=float, help="default: the preset's")
    parser.add_argument("--req-rate", type=float, help="default: the preset's")
    parser.add_argument("--cv", type=float, help="default: the preset's")
    parser.add_argument("--duration", type=float, help="default: the preset's (seconds)")
    parser.add_argument("--seed", type=int, help="default: the preset's")
    parser.add_argument("--output", type=Path, required=True)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
