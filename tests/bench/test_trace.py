"""The synthetic S-LoRA workload: its distributions, determinism, file format, presets.

Distribution checks draw one large seeded sample and compare estimates with the
parameters at about five standard errors, so they fail on a wrong formula (a
swapped gamma scale, an off-by-one range end), not on sampling noise.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loraserve.bench.trace import (
    FIRST_PROMPT_TOKEN,
    PRESETS,
    TraceParams,
    adapter_name,
    generate_trace,
    read_trace,
    write_trace,
)

# ~50,000 requests of one-token prompts: large samples, generated in a fraction of a second.
LARGE = TraceParams(
    num_adapters=16,
    alpha=1.0,
    req_rate=50.0,
    cv=1.0,
    duration=1000.0,
    input_range=(1, 1),
    output_range=(1, 1),
    seed=7,
    vocab_size=100,
)
SMALL = replace(LARGE, req_rate=5.0, duration=20.0, input_range=(4, 12), output_range=(2, 9))


def gaps(params: TraceParams) -> np.ndarray:
    arrivals = np.array([request.arrival_s for request in generate_trace(params)])
    return np.diff(arrivals, prepend=0.0)


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0])
def test_gaps_have_the_rate_and_cv(cv: float) -> None:
    sample = gaps(replace(LARGE, cv=cv))
    count = len(sample)
    # Standard errors: of the mean, cv / (rate sqrt(n)); of the CV at cv = 2 (gamma
    # shape 1/4, excess kurtosis 24), about 1.1% relative for n = 50,000.
    assert count == pytest.approx(LARGE.req_rate * LARGE.duration, rel=5 * cv / np.sqrt(count))
    assert sample.mean() == pytest.approx(1 / LARGE.req_rate, rel=5 * cv / np.sqrt(count))
    assert sample.std() / sample.mean() == pytest.approx(cv, rel=0.06)


def test_arrivals_are_sorted_and_inside_the_duration() -> None:
    arrivals = [request.arrival_s for request in generate_trace(replace(LARGE, cv=4.0))]
    assert arrivals == sorted(arrivals)
    assert arrivals[0] > 0 and arrivals[-1] < LARGE.duration
    assert arrivals[-1] > 0.99 * LARGE.duration  # the last stretch is covered too


def adapter_indices(params: TraceParams) -> np.ndarray:
    names = [request.adapter for request in generate_trace(params)]
    assert all(name is not None and name.startswith("lora-") for name in names)
    return np.array([int(name.removeprefix("lora-")) for name in names if name is not None])


def test_alpha_one_is_uniform() -> None:
    counts = np.bincount(adapter_indices(LARGE), minlength=LARGE.num_adapters)
    assert len(counts) == LARGE.num_adapters  # no index past the last adapter
    expected = counts.sum() / LARGE.num_adapters
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 37.7  # the 0.1% critical value at 15 degrees of freedom


@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.6])
def test_alpha_below_one_follows_the_power_law(alpha: float) -> None:
    params = replace(LARGE, num_adapters=100, alpha=alpha)
    indices = adapter_indices(params)
    k = np.arange(1, params.num_adapters + 1)
    observed = np.searchsorted(np.sort(indices), k, side="left") / len(indices)  # P(index < k)
    expected = (k / params.num_adapters) ** alpha
    # Kolmogorov-Smirnov: 1.63 / sqrt(n) is the 1% critical distance.
    assert np.abs(observed - expected).max() < 1.63 / np.sqrt(len(indices))
    assert indices.max() < params.num_adapters


def test_lengths_are_uniform_over_the_inclusive_ranges() -> None:
    params = replace(LARGE, input_range=(3, 40), output_range=(8, 64), duration=400.0)
    requests = generate_trace(params)
    for values, (low, high) in (
        (np.array([len(r.prompt_token_ids) for r in requests]), params.input_range),
        (np.array([r.output_len for r in requests]), params.output_range),
    ):
        assert values.min() == low and values.max() == high
        counts = np.bincount(values - low)
        assert len(counts) == high - low + 1 and counts.min() > 0
        standard_error = (high - low + 1) / np.sqrt(12 * len(values))
        assert abs(values.mean() - (low + high) / 2) < 5 * standard_error


def test_prompt_tokens_avoid_special_tokens_and_cover_the_vocabulary() -> None:
    tokens = np.concatenate(
        [r.prompt_token_ids for r in generate_trace(replace(SMALL, duration=200.0))]
    )
    assert tokens.min() == FIRST_PROMPT_TOKEN and tokens.max() == SMALL.vocab_size - 1


def test_no_adapters_means_the_base_model() -> None:
    requests = generate_trace(replace(SMALL, num_adapters=0))
    assert requests and all(request.adapter is None for request in requests)


def test_same_seed_same_trace_other_seed_other_trace() -> None:
    assert generate_trace(SMALL) == generate_trace(SMALL)
    other = generate_trace(replace(SMALL, seed=SMALL.seed + 1))
    assert [r.arrival_s for r in other] != [r.arrival_s for r in generate_trace(SMALL)]


def test_adapter_parameters_change_only_the_adapters() -> None:
    """An adapter sweep replays the same arrivals, prompts and output lengths."""
    base = generate_trace(SMALL)
    for changed in (replace(SMALL, num_adapters=1000), replace(SMALL, alpha=0.2)):
        other = generate_trace(changed)
        assert [replace(r, adapter=None) for r in other] == [replace(r, adapter=None) for r in base]
        assert [r.adapter for r in other] != [r.adapter for r in base]


def test_a_longer_duration_extends_the_trace() -> None:
    params = replace(SMALL, req_rate=100.0)  # 2,000 and 6,000 gaps: several chunks of gaps
    short, long = generate_trace(params), generate_trace(replace(params, duration=60.0))
    assert len(long) > len(short) > 0
    assert long[: len(short)] == short


def test_write_read_round_trip(tmp_path) -> None:
    for params in (SMALL, replace(SMALL, num_adapters=0)):
        requests = generate_trace(params)
        write_trace(tmp_path / "trace.jsonl", params, requests)
        assert read_trace(tmp_path / "trace.jsonl") == (params, requests)


def test_adapter_names_sort_by_index() -> None:
    assert adapter_name(7) == "lora-0007"
    assert sorted(adapter_name(i) for i in (10, 2, 1999)) == [
        adapter_name(i) for i in (2, 10, 1999)
    ]


@pytest.mark.parametrize(
    "field, value",
    [
        *(("alpha", 0.0), ("req_rate", -1.0), ("cv", 0.0), ("duration", 0.0)),
        *(("num_adapters", -1), ("input_range", (0, 4)), ("output_range", (9, 8))),
        ("vocab_size", FIRST_PROMPT_TOKEN),
    ],
)
def test_bad_params_are_refused(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        replace(SMALL, **{field: value})


@settings(max_examples=40, deadline=None)
@given(
    num_adapters=st.integers(0, 50),
    alpha=st.floats(0.05, 4.0),
    cv=st.floats(0.2, 6.0),
    low=st.integers(1, 20),
    extra=st.integers(0, 20),
    seed=st.integers(0, 2**32),
)
def test_every_request_is_well_formed(
    num_adapters: int, alpha: float, cv: float, low: int, extra: int, seed: int
) -> None:
    params = replace(
        SMALL,
        num_adapters=num_adapters,
        alpha=alpha,
        cv=cv,
        input_range=(low, low + extra),
        output_range=(low, low + extra),
        seed=seed,
    )
    names = {adapter_name(i) for i in range(num_adapters)} if num_adapters else {None}
    for index, request in enumerate(generate_trace(params)):
        assert request.index == index and 0 < request.arrival_s < params.duration
        assert request.adapter in names
        assert low <= len(request.prompt_token_ids) <= low + extra
        assert low <= request.output_len <= low + extra
        assert all(FIRST_PROMPT_TOKEN <= t < params.vocab_size for t in request.prompt_token_ids)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_fit_their_models(name: str) -> None:
    from loraserve.bench.models import SHAPES

    preset = PRESETS[name]
    shape = SHAPES[preset.model]
    params = preset.trace
    assert preset.name == name and preset.ranks and all(0 < r <= 64 for r in preset.ranks)
    assert params.vocab_size == shape.vocab_size
    assert params.input_range[1] + params.output_range[1] <= shape.max_position_embeddings
    requests = generate_trace(params)
    assert len(requests) == pytest.approx(params.req_rate * params.duration, rel=0.2)
    assert {r.adapter for r in requests} <= {adapter_name(i) for i in range(params.num_adapters)}


def test_paper_presets_are_the_paper_settings() -> None:
    """S-LoRA's Table 3 workload: alpha 1, 10 req/s, cv 1, 8..512 tokens in and out."""
    for name, ranks in (("7b-s1", (8,)), ("7b-s2", (64, 32, 16, 8))):
        preset = PRESETS[name]
        assert preset.ranks == ranks and preset.model == "llama-2-7b"
        params = preset.trace
        assert (params.alpha, params.req_rate, params.cv) == (1.0, 10.0, 1.0)
        assert params.input_range == params.output_range == (8, 512)
