"""A generation request's body -> the engine's `SamplingParams`, or a 400 naming the field.

Every field of server/protocol.py's request models ends up in one of three places:
honoured (here, or by the route: echo, tools, templates, usage...), refused with a
400 that names it (`REFUSED`, `_refuse_structured`), or accepted because it cannot
change the output (`user`, `metadata`, ...; listed in `NO_EFFECT`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from loraserve.engine.core.sampling_params import SamplingParams
from loraserve.engine.sampling.structured import StructuredOutputs, allowed_token_ids
from loraserve.errors import InvalidRequestError
from loraserve.models.tokenizer import Tokenizer
from loraserve.server.grammar_check import GrammarChecker
from loraserve.server.limits import RequestLimits
from loraserve.server.protocol import SamplingFields

NO_EFFECT = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "cache_salt",
        "prediction",
        "request_id",
        "include_reasoning",
    }
)
"""Fields accepted whatever their value: none changes the output (`request_id` names the
response; `include_reasoning` acts only with a reasoning parser, which loraserve has not)."""

Refusal = tuple[str, Callable[[Any], bool], str]
REFUSED: tuple[Refusal, ...] = (
    ("use_beam_search", lambda v: bool(v), "beam search is not supported"),
    ("length_penalty", lambda v: v not in (None, 1.0), "length_penalty is for beam search"),
    ("early_stopping", lambda v: bool(v), "early_stopping is for beam search"),
    ("logits_processors", lambda v: bool(v), "custom logits processors are not supported"),
    ("priority", lambda v: v not in (None, 0), "priority scheduling is not supported"),
    ("kv_transfer_params", lambda v: bool(v), "KV transfer is not supported"),
    ("vllm_xargs", lambda v: bool(v), "vllm_xargs is not supported"),
    (
        "spaces_between_special_tokens",
        lambda v: v is False,
        "only spaces_between_special_tokens true is supported",
    ),
    ("suffix", lambda v: bool(v), "suffix is not supported"),
    ("functions", lambda v: v is not None, "functions is deprecated: use tools"),
    ("function_call", lambda v: v is not None, "function_call is deprecated: use tool_choice"),
    ("modalities", lambda v: v not in (None, ["text"]), "only text output is supported"),
    ("audio", lambda v: v is not None, "audio output is not supported"),
    ("verbosity", lambda v: v is not None, "verbosity is not supported"),
    ("web_search_options", lambda v: v is not None, "web search is not supported"),
    ("mm_processor_kwargs", lambda v: bool(v), "this server serves text models only"),
)
"""(field, refused when, why): values loraserve cannot honour."""
GUIDED_BACKENDS = ("auto", "guidance", "llguidance", "xgrammar", "outlines", "lm-format-enforcer")
"""`guided_decoding_backend` values accepted: the constraint is honoured whichever engine a
client names (loraserve's is llguidance; engine/sampling/structured.py says why)."""


def refuse_unsupported(body: Any) -> None:
    """A 400 naming the first field whose value cannot be honoured."""
    for name, refused, why in REFUSED:
        if hasattr(body, name) and refused(getattr(body, name)):
            raise InvalidRequestError(f"{name}: {why}", name)
    if body.stream_options is not None and not body.stream:
        raise InvalidRequestError("stream_options needs stream: true", "stream_options")
    backend = body.guided_decoding_backend
    if backend is not None and backend.split(":")[0] not in GUIDED_BACKENDS:
        raise InvalidRequestError(
            f"guided_decoding_backend must be one of {', '.join(GUIDED_BACKENDS)}, got {backend!r}",
            "guided_decoding_backend",
        )


def sampling_params(
    body: SamplingFields,
    max_tokens: int | None,
    logprobs: int | None,
    limits: RequestLimits,
    tokenizer: Tokenizer,
    checked: CheckedConstraint | None,
    eos_token_ids: Sequence[int],
) -> SamplingParams:
    """The engine's params from the body; InvalidRequestError (400) names a bad field.
    The server's limits on counts come first, so that nothing is built for a huge list;
    last, some token must be allowed first (`check_first_token`)."""
    limits.check_stops(body.stop, body.stop_token_ids or [])
    limits.check_token_lists(body.allowed_token_ids, body.logit_bias, body.bad_words)
    values: dict[str, Any] = {
        "n": body.n,
        "min_tokens": body.min_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "seed": body.seed,
        "stop": body.stop,
        "stop_token_ids": body.stop_token_ids,
        "ignore_eos": body.ignore_eos,
        "include_stop_str_in_output": body.include_stop_str_in_output,
        "repetition_penalty": body.repetition_penalty,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "logprobs": logprobs,
        "prompt_logprobs": body.prompt_logprobs,
        "skip_special_tokens": body.skip_special_tokens,
        "logit_bias": _logit_bias(body.logit_bias),
        "allowed_token_ids": body.allowed_token_ids,
        "bad_words_token_ids": _bad_words(body.bad_words, tokenizer),
        "structured_outputs": None if checked is None else checked.constraint,
    }
    # null means "the default", except for max_tokens (null = up to the context limit).
    given = {name: value for name, value in values.items() if value is not None}
    params = SamplingParams(**given, max_tokens=max_tokens)
    check_first_token(params, checked, eos_token_ids)
    return params


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's keys are token ids as strings."""
    if not bias:
        return None
    try:
        return {int(token): value for token, value in bias.items()}
    except ValueError:
        raise InvalidRequestError(
            "logit_bias keys must be token ids (integers as strings)", "logit_bias"
        ) from None


def _bad_words(words: list[str] | None, tokenizer: Tokenizer) -> list[list[int]] | None:
    """Each word's tokens, alone and after a space (vLLM bans both spellings)."""
    if not words:
        return None
    sequences = []
    for word in words:
        for text in (word, " " + word.lstrip()):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if ids and ids not in sequences:
                sequences.append(ids)
    return sequences


def structured_outputs(body: SamplingFields) -> tuple[StructuredOutputs, str] | None:
    """The request's output constraint and the field that asked for it, from whichever
    spelling was used (OpenAI's `response_format`, vLLM's `structured_outputs` or
    `guided_*`); at most one may be used."""
    found: list[tuple[StructuredOutputs, str]] = []
    whitespace = body.guided_whitespace_pattern
    if body.response_format is not None and body.response_format.type != "text":
        found.append((_from_response_format(body.response_format, whitespace), "response_format"))
    if body.structured_outputs is not None:
        found.append((_from_structured(body.structured_outputs), "structured_outputs"))
    guided = {
        "json": body.guided_json,
        "regex": body.guided_regex,
        "choice": body.guided_choice,
        "grammar": body.guided_grammar,
    }
    for kind, value in guided.items():
        if value is not None:
            constraint = _constraint(
                f"guided_{kind}", whitespace_pattern=whitespace, **{kind: value}
            )
            found.append((constraint, f"guided_{kind}"))
    if len(found) > 1:
        names = ", ".join(param for _, param in found)
        raise InvalidRequestError(
            f"only one output constraint may be given, got {names}", found[1][1]
        )
    return found[0] if found else None


def _from_response_format(response_format: Any, whitespace: str | None) -> StructuredOutputs:
    if response_format.type == "json_object":
        return _constraint("response_format", json_object=True, whitespace_pattern=whitespace)
    spec = response_format.json_schema
    if spec is None or spec.schema_ is None:
        raise InvalidRequestError(
            "response_format json_schema needs json_schema.schema", "response_format"
        )
    return _constraint("response_format", json=spec.schema_, whitespace_pattern=whitespace)


def _from_structured(body: Any) -> StructuredOutputs:
    if body.structural_tag is not None:
        raise InvalidRequestError(
            "structured_outputs.structural_tag is not supported", "structured_outputs"
        )
    whitespace = body.whitespace_pattern
    if body.disable_any_whitespace:
        whitespace = ""
    return _constraint(
        "structured_outputs",
        json=body.json_,
        regex=body.regex,
        choice=body.choice,
        grammar=body.grammar,
        json_object=bool(body.json_object),
        whitespace_pattern=whitespace,
        disable_additional_properties=bool(body.disable_additional_properties),
    )


def _constraint(param: str, **fields: Any) -> StructuredOutputs:
    if isinstance(fields.get("json"), str):
        try:
            json.loads(fields["json"])
        except ValueError as error:
            raise InvalidRequestError(f"{param}: not JSON: {error}", param) from None
    try:
        return StructuredOutputs(**fields)
    except InvalidRequestError as error:
        raise InvalidRequestError(str(error), param) from None


@dataclass(frozen=True)
class CheckedConstraint:
    """An output constraint that compiled, and the tokens it allows first."""

    constraint: StructuredOutputs
    param: str
    first_mask: np.ndarray
    """Bitmask row of the tokens allowed first (`GrammarCompiler.first_mask`)."""


async def checked_grammar(
    found: tuple[StructuredOutputs, str] | None, limits: RequestLimits, checker: GrammarChecker
) -> CheckedConstraint | None:
    """The constraint, once its size is within the limits and it compiled (in a child
    process: server/grammar_check.py); a 400 naming its field otherwise."""
    if found is None:
        return None
    constraint, param = found
    limits.check_constraint(constraint, param)
    mask = await checker.first_mask(constraint, param)
    return CheckedConstraint(constraint, param, mask)


def check_first_token(
    params: SamplingParams, checked: CheckedConstraint | None, eos_token_ids: Sequence[int]
) -> None:
    """A 400 unless some token may be sampled first: the grammar's first tokens, within
    `allowed_token_ids`, less the tokens that would end the request before `min_tokens`
    (the sampler would otherwise find every token masked and fail the request)."""
    allowed: set[int] | None = None
    if params.allowed_token_ids is not None:
        allowed = set(params.allowed_token_ids)
    if checked is not None:
        first = set(allowed_token_ids(checked.first_mask).tolist())
        if allowed is not None and not allowed & first:
            raise InvalidRequestError(
                f"allowed_token_ids: {checked.param} allows none of them first",
                "allowed_token_ids",
            )
        allowed = first if allowed is None else allowed & first
    if allowed is None or not params.min_tokens:
        return
    stops = set(params.stop_token_ids)
    if not params.ignore_eos:
        stops.update(eos_token_ids)
    if allowed <= stops:
        raise InvalidRequestError(
            "min_tokens: every token allowed first would end the output before min_tokens",
            "min_tokens",
        )
