"""SamplingParams: vLLM defaults, input normalisation, one error per bad value."""

from __future__ import annotations

import math

import pytest

from loraserve.engine.core.sampling_params import MAX_LOGPROBS, SamplingParams
from loraserve.errors import InvalidRequestError


def test_defaults_match_vllm() -> None:
    params = SamplingParams()
    assert (params.n, params.max_tokens, params.min_tokens) == (1, 16, 0)
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (1.0, 1.0, 0, 0.0)
    assert params.stop == [] and params.stop_token_ids == [] and params.logprobs is None
    assert params.skip_special_tokens and not params.ignore_eos and not params.greedy


def test_stop_string_is_wrapped_and_none_accepted() -> None:
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=None, stop_token_ids=None).stop == []  # type: ignore[arg-type]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("temperature", "top_k", "greedy", "effective_top_k"),
    [(0.0, 0, True, 0), (1e-7, 5, True, 5), (0.7, -1, False, 0), (5.0, 3, False, 3)],
)
def test_greedy_and_effective_top_k(
    temperature: float, top_k: int, greedy: bool, effective_top_k: int
) -> None:
    params = SamplingParams(temperature=temperature, top_k=top_k)
    assert params.greedy is greedy
    assert params.effective_top_k == effective_top_k


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0),
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("min_tokens", -1),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", 1e39),  # infinite in float32
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", math.nan),
        ("top_k", -2),
        ("top_k", 2**63),  # no int64, let alone int32
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", 1e-38),  # logits divided by it overflow
        ("repetition_penalty", 2.5),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.01),
        ("frequency_penalty", 3.0),
        ("frequency_penalty", -2.5),
        ("logprobs", -1),
        ("logprobs", MAX_LOGPROBS + 1),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop_token_ids", [3, -1]),
    ],
)
def test_bad_value_names_its_param(field: str, value: object) -> None:
    with pytest.raises(InvalidRequestError) as error:
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    assert error.value.param == field
    offending = value[-1] if isinstance(value, list) else value  # lists: the last item is bad
    assert str(error.value).startswith(field) and repr(offending) in str(error.value)


def test_min_tokens_above_max_tokens_is_refused() -> None:
    with pytest.raises(InvalidRequestError) as error:
        SamplingParams(max_tokens=4, min_tokens=5)
    assert error.value.param == "min_tokens" and "max_tokens (4)" in str(error.value)
    assert SamplingParams(max_tokens=None, min_tokens=5).min_tokens == 5


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=0.0, top_p=1.0, top_k=-1, min_p=1.0),
        dict(temperature=7.5, top_p=1e-3, top_k=1, logprobs=0),
        dict(presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=1e-3),
        dict(max_tokens=None, logprobs=MAX_LOGPROBS, seed=-5, stop_token_ids=[0]),
    ],
)
def test_edge_values_are_accepted(kwargs: dict[str, object]) -> None:
    SamplingParams(**kwargs)  # type: ignore[arg-type]
