"""Property: whatever one row asks for, the sampler never raises and the other rows of the
batch get the tokens they would get alone.

Hostile rows mix extreme values that `SamplingParams` accepts (top_p 1e-50, top_k 2**31 - 1,
every token a stop token before min_tokens...) with values it refuses, set after
construction as a caller that skipped validation would (infinite temperature, a
repetition penalty of 1e-38, top_k 2**63), and logits with NaN and infinities. Normal
rows are greedy or seeded, so that their tokens do not depend on the batch.
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sampling_rows_of import SequenceTokens, rows_of

from loraserve.engine.core.sampling_params import SamplingParams
from loraserve.engine.sampling.sampler import NO_TOKEN_LEFT, NOT_FINITE, sample

VOCAB_SIZE = 32
EOS = 1
EXTREME_FLOATS = [
    0.0,
    1e-50,
    1e-38,
    1e-5,
    0.5,
    1.0,
    2.0,
    100.0,
    1e39,
    math.inf,
    -math.inf,
    math.nan,
]


@st.composite
def hostile_params(draw: st.DrawFn) -> SamplingParams:
    """Accepted extremes, then (sometimes) raw values written over validation."""
    everything = list(range(VOCAB_SIZE))
    params = SamplingParams(
        temperature=draw(st.sampled_from([0.0, 1e-6, 1e-5, 0.7, 100.0])),
        top_p=draw(st.sampled_from([1e-50, 1e-8, 0.3, 1.0])),
        top_k=draw(st.sampled_from([-1, 0, 1, 5, 2**31 - 1])),
        min_p=draw(st.sampled_from([0.0, 0.5, 1.0])),
        repetition_penalty=draw(st.sampled_from([1e-4, 1.0, 2.0])),
        presence_penalty=draw(st.sampled_from([-2.0, 0.0, 2.0])),
        frequency_penalty=draw(st.sampled_from([-2.0, 0.0, 2.0])),
        min_tokens=draw(st.sampled_from([0, 1, 10**6])),
        max_tokens=None,
        stop_token_ids=draw(st.sampled_from([[], [EOS, 3], everything])),
        ignore_eos=draw(st.booleans()),
        logprobs=draw(st.sampled_from([None, 0, 20])),
        seed=draw(st.sampled_from([None, -1, 2**63 - 1])),
    )
    raw = draw(
        st.dictionaries(
            st.sampled_from(
                ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty"]
            ),
            st.sampled_from(EXTREME_FLOATS),
        )
    )
    raw |= draw(st.dictionaries(st.just("top_k"), st.sampled_from([2**63, -(2**40)])))
    raw |= draw(st.dictionaries(st.just("seed"), st.sampled_from([2**70, -(2**70)])))
    for name, value in raw.items():
        setattr(params, name, value)  # what validation would have refused
    return params


@st.composite
def hostile_logits(draw: st.DrawFn) -> torch.Tensor:
    """A row of logits, sometimes poisoned with NaN and infinities."""
    row = torch.randn(VOCAB_SIZE, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    poison = draw(
        st.lists(
            st.tuples(
                st.integers(0, VOCAB_SIZE - 1),
                st.sampled_from([math.nan, math.inf, -math.inf, 3e38, -3e38]),
            ),
            max_size=3,
        )
    )
    for index, value in poison:
        row[index] = value
    if draw(st.booleans()):
        row[:] = -math.inf  # everything masked by the model itself
    return row * draw(st.sampled_from([1.0, 1e30]))


NORMAL = [
    SamplingParams(temperature=0.0, max_tokens=None),
    SamplingParams(temperature=0.8, top_k=8, top_p=0.9, seed=11, max_tokens=None),
    SamplingParams(temperature=1.0, repetition_penalty=1.3, seed=12, logprobs=3, max_tokens=None),
]


def run(logits: torch.Tensor, params: list[SamplingParams], histories: list[SequenceTokens]):
    return sample(logits, rows_of(params, VOCAB_SIZE, histories, eos_token_ids=(EOS,)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hostile=st.lists(st.tuples(hostile_params(), hostile_logits()), min_size=1, max_size=4),
    positions=st.randoms(use_true_random=False),
)
def test_hostile_rows_never_raise_nor_change_normal_rows(hostile, positions) -> None:
    torch.manual_seed(0)
    normal_logits = torch.randn(len(NORMAL), VOCAB_SIZE) * 3  # [num_normal, vocab_size]
    normal_histories = [SequenceTokens([2, 5, 7], [9]) for _ in NORMAL]
    alone = run(normal_logits, NORMAL, normal_histories)
    assert alone.failures == [None] * len(NORMAL)

    rows = [("normal", i) for i in range(len(NORMAL))] + [
        ("hostile", i) for i in range(len(hostile))
    ]
    positions.shuffle(rows)
    logits = torch.stack(
        [normal_logits[i] if kind == "normal" else hostile[i][1] for kind, i in rows]
    )  # [num_rows, vocab_size]
    params = [NORMAL[i] if kind == "normal" else hostile[i][0] for kind, i in rows]
    histories = [
        normal_histories[i] if kind == "normal" else SequenceTokens([3, 4], [5, 5])
        for kind, i in rows
    ]
    mixed = run(logits, params, histories)

    for position, (kind, i) in enumerate(rows):
        if kind == "normal":
            assert mixed.token_ids[position] == alone.token_ids[i]
            assert mixed.failures[position] is None
            assert mixed.logprobs[position] == alone.logprobs[i]
        elif mixed.failures[position] is None:
            assert 0 <= mixed.token_ids[position] < VOCAB_SIZE
        else:
            assert mixed.failures[position] in (NO_TOKEN_LEFT, NOT_FINITE)


def test_a_row_with_every_token_masked_fails_alone() -> None:
    """The issue's case: every token is a stop token and min_tokens is not reached."""
    everything = list(range(VOCAB_SIZE))
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(min_tokens=1, stop_token_ids=everything),
        SamplingParams(temperature=0.0, min_tokens=1, stop_token_ids=everything),
    ]
    logits = torch.randn(3, VOCAB_SIZE)
    output = run(logits, params, [SequenceTokens([2], []) for _ in params])
    assert output.failures == [None, NO_TOKEN_LEFT, NO_TOKEN_LEFT]
    assert output.token_ids[0] == int(logits[0].argmax())


def test_nan_logits_fail_their_row_alone() -> None:
    logits = torch.randn(2, VOCAB_SIZE)
    logits[1, 4] = math.nan
    output = run(
        logits, [SamplingParams(seed=1), SamplingParams(seed=1)], [SequenceTokens([2], [])] * 2
    )
    assert output.failures == [None, NOT_FINITE]


def test_a_top_p_that_float32_rounds_to_zero_keeps_the_most_likely_token() -> None:
    logits = torch.randn(4, VOCAB_SIZE)
    params = [SamplingParams(top_p=1e-50, seed=seed) for seed in range(4)]
    output = run(logits, params, [SequenceTokens([2], [])] * 4)
    assert output.failures == [None] * 4
    assert output.token_ids == logits.argmax(dim=-1).tolist()
