"""Pick the next token of every sequence in a batch, each with its own sampling params.

Semantics, per row (as vLLM does it):

    logprobs   = log_softmax(float32(raw logits))            # reported, never penalized
    logits     = constraints (logit_bias, allowed_token_ids, bad_words, grammar; constraints.py)
                 -> repetition(prompt + output) -> frequency/presence(output) -> min_tokens mask
    greedy     : token = argmax(logits)
    sampled    : logits /= temperature -> top_k -> top_p -> min_p
                 token  = multinomial(softmax(logits), generator of the row)

A row that cannot be sampled fails alone, never the batch: if every token of a row
is excluded (EOS and `stop_token_ids` masked until `min_tokens` over the whole
vocabulary, say) or its logits are not finite (NaN or +inf from the model or a
penalty), `SamplerOutput.failures` says why for that row and its token is
meaningless; the other rows are sampled as if it were not there. loraserve fails such
a request with that message rather than doing what vLLM does (its sampler draws an
arbitrary token from a NaN distribution and carries on): a request whose
distribution broke down has no meaningful next token to give. `SamplingParams`
refuses every value that could cause it, so a failure here means a model that
produced NaN, or a combination of masks that left nothing.

Per-request state the sampler needs (`TokenHistory`): the prompt token ids and the
output token ids so far; penalties are recomputed from them every step, which
keeps the engine's request object the single owner of that state. A request
with a seed has its own `torch.Generator`, made once by the model runner with
`make_generator` and passed for every step, so its draws depend on nothing else
in the batch; requests without a seed pass None and share the default generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from loraserve.engine.constraints import GrammarMasks, apply_constraints
from loraserve.engine.outputs import TokenLogprobs
from loraserve.engine.sampling_params import SamplingParams

_SEED_MASK = (1 << 64) - 1  # torch seeds are 64-bit; any Python int maps into that range


class TokenHistory(Protocol):
    """The tokens of one sequence that the penalties look at."""

    @property
    def prompt_token_ids(self) -> Sequence[int]: ...

    @property
    def output_token_ids(self) -> Sequence[int]: ...


@dataclass
class SequenceTokens:
    """A plain `TokenHistory`, for callers without a request object at hand."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]


NO_TOKEN_LEFT = "every token was excluded by this request's sampling parameters"
NOT_FINITE = "the model's logits for this request are not finite (NaN or infinity)"


@dataclass
class SamplerOutput:
    """One step's choice for every row of the batch, in batch order."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    """None for the rows whose request did not ask for logprobs."""
    failures: list[str | None]
    """Why a row could not be sampled (its token is meaningless), or None for a good row."""
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    """Request id -> logprobs of the prompt tokens this step's chunk of it covered, in
    order (the runner adds them for requests with `prompt_logprobs`)."""


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator for one seeded request, on the device the logits live on."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed & _SEED_MASK)
    return generator


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    token_histories: Sequence[TokenHistory],
    generators: Sequence[torch.Generator | None],
    eos_token_ids: Sequence[int] = (),
    grammar: GrammarMasks | None = None,
) -> SamplerOutput:
    """Choose one token per row of `logits`.

    logits: [num_seqs, vocab_size], any float dtype; not modified.
    params, token_histories, generators: one per row.
    eos_token_ids: the model's EOS ids, masked (with `stop_token_ids`) until a
        request has `min_tokens` outputs.
    grammar: the allowed-token bitmasks of the rows with structured output.
    """
    num_seqs = logits.shape[0]
    assert len(params) == len(token_histories) == len(generators) == num_seqs
    logits = logits.to(torch.float32, copy=True)  # [num_seqs, vocab_size]
    raw_logprobs = None
    if any(p.logprobs is not None for p in params):
        raw_logprobs = torch.log_softmax(logits, dim=-1)  # [num_seqs, vocab_size]

    apply_constraints(logits, params, token_histories, grammar)
    apply_penalties(logits, params, token_histories)
    _mask_stop_tokens_before_min_tokens(logits, params, token_histories, eos_token_ids)
    failure_codes = _failure_codes(logits)  # [num_seqs]

    token_ids = logits.argmax(dim=-1)  # [num_seqs]; kept for the greedy rows
    sampled_rows = [row for row, p in enumerate(params) if not p.greedy]
    if sampled_rows:
        rows = torch.tensor(sampled_rows, device=logits.device)
        probs = _sampling_probs(logits[rows], [params[row] for row in sampled_rows])
        # A row whose probabilities broke down anyway draws from a stand-in, so that
        # multinomial never raises; its failure code is already set.
        broken = ~torch.isfinite(probs).all(dim=-1) | ~(probs.sum(dim=-1) > 0)  # [num_rows]
        failure_codes[rows] = torch.where(
            broken & (failure_codes[rows] == 0), _NOT_FINITE_CODE, failure_codes[rows]
        )
        probs[broken] = 1.0
        token_ids[rows] = _draw(probs, [generators[row] for row in sampled_rows])
    logprobs: list[TokenLogprobs | None] = [None] * num_seqs
    if raw_logprobs is not None:
        logprobs = gather_logprobs(raw_logprobs, token_ids, [p.logprobs for p in params])
    # One transfer for both: on a GPU every .tolist() is a sync.
    token_list, code_list = torch.stack([token_ids, failure_codes]).tolist()
    failures = [_FAILURES[code] for code in code_list]
    return SamplerOutput(token_ids=token_list, logprobs=logprobs, failures=failures)


_NO_TOKEN_LEFT_CODE, _NOT_FINITE_CODE = 1, 2
_FAILURES = (None, NO_TOKEN_LEFT, NOT_FINITE)


def _failure_codes(logits: torch.Tensor) -> torch.Tensor:
    """Per row: 0 if it can be sampled, else why not (an index into _FAILURES).

    logits: [num_seqs, vocab_size] float32, after penalties and masks. Returns [num_seqs] long.
    """
    # One pass over the logits: a row's maximum is NaN if any entry is (amax propagates
    # NaN), +inf if one is, and -inf only if every entry is.
    row_max = logits.amax(dim=-1)  # [num_seqs]
    not_finite = torch.isnan(row_max) | torch.isposinf(row_max)
    nothing_left = torch.isneginf(row_max)
    codes = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    codes = codes.masked_fill(nothing_left, _NO_TOKEN_LEFT_CODE)
    return codes.masked_fill(not_finite, _NOT_FINITE_CODE)


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    token_histories: Sequence[TokenHistory],
) -> None:
    """Repetition, frequency and presence penalties, in place.

    Semantics, for row r with penalties (rep, freq, pres) and output counts c[t]:
        for t in set(prompt + output): l[t] = l[t] / rep if l[t] > 0 else l[t] * rep
        l[t] -= freq * c[t] + pres * (c[t] > 0)
    logits: [num_seqs, vocab_size] float32.
    """
    vocab_size = logits.shape[1]
    for row, (p, history) in enumerate(zip(params, token_histories, strict=True)):
        if p.repetition_penalty != 1.0:
            seen = list(history.prompt_token_ids) + list(history.output_token_ids)
            if seen:
                ids = torch.tensor(seen, device=logits.device).unique()  # [num_distinct]
                values = logits[row, ids]
                penalty = p.repetition_penalty
                logits[row, ids] = torch.where(values > 0, values / penalty, values * penalty)
        if (p.frequency_penalty or p.presence_penalty) and history.output_token_ids:
            output = torch.tensor(list(history.output_token_ids), device=logits.device)
            counts = torch.bincount(output, minlength=vocab_size)[:vocab_size]  # [vocab_size]
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)


def _mask_stop_tokens_before_min_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    token_histories: Sequence[TokenHistory],
    eos_token_ids: Sequence[int],
) -> None:
    """Forbid EOS and stop_token_ids (in place) for rows short of `min_tokens` outputs."""
    vocab_size = logits.shape[1]
    for row, (p, history) in enumerate(zip(params, token_histories, strict=True)):
        if not p.min_tokens or len(history.output_token_ids) >= p.min_tokens:
            continue
        # With ignore_eos, EOS does not end the request, so there is nothing to delay.
        stop_ids = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))
        stop_ids = [token_id for token_id in stop_ids if token_id < vocab_size]
        logits[row, stop_ids] = float("-inf")


def _sampling_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top_k, top_p and min_p for rows that sample; returns probabilities.

    logits: [num_rows, vocab_size] float32 (a copy, changed freely). Returns the same shape.
    """
    device = logits.device
    temperatures = torch.tensor([p.temperature for p in params], device=device)  # [num_rows]
    logits = logits / temperatures.unsqueeze(1)
    if any(p.effective_top_k or p.top_p < 1 for p in params):
        vocab_size = logits.shape[1]
        top_k = torch.tensor(  # [num_rows]; clamped, so that no value overflows a tensor
            [min(p.effective_top_k, vocab_size) for p in params], device=device
        )
        top_p = torch.tensor([p.top_p for p in params], device=device)  # [num_rows]
        logits = _apply_top_k_top_p(logits, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)  # [num_rows, vocab_size]
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)  # [num_rows]
        threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        # The top token always survives (its prob >= min_p * itself, since min_p <= 1).
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Set to -inf every logit outside the row's top_k, then outside its top_p nucleus.

    logits: [num_rows, vocab_size]; top_k: [num_rows] (0 = off); top_p: [num_rows] (1 = off).
    A token is kept by top_p when the probability of the tokens ranked above it is
    < top_p: the smallest set reaching top_p, and always the most likely token (also
    when top_p is so small that float32 rounds it to 0).
    """
    vocab_size = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [num_rows, vocab_size] each
    positions = torch.arange(vocab_size, device=logits.device).unsqueeze(0)  # [1, vocab_size]
    k = torch.where(top_k > 0, top_k, vocab_size).unsqueeze(1)  # [num_rows, 1]
    sorted_logits = sorted_logits.masked_fill(positions >= k, float("-inf"))

    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_above = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # exclusive prefix sum
    # top_p == 1 skips the test: rounding could make the mass above a tail token reach 1.0.
    outside_nucleus = (mass_above >= top_p.unsqueeze(1)) & (top_p.unsqueeze(1) < 1)
    outside_nucleus[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(outside_nucleus, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One multinomial draw per row; seeded rows each from their own generator.

    probs: [num_rows, vocab_size]. Returns [num_rows] token ids.
    """
    drawn = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    unseeded = [row for row, generator in enumerate(generators) if generator is None]
    if unseeded:  # one call for all of them: they share the default generator anyway
        rows = torch.tensor(unseeded, device=probs.device)
        drawn[rows] = torch.multinomial(probs[rows], num_samples=1).squeeze(1)
    for row, generator in enumerate(generators):
        if generator is not None:
            drawn[row] = torch.multinomial(probs[row], num_samples=1, generator=generator)[0]
    return drawn


def gather_logprobs(
    raw_logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: Sequence[int | None]
) -> list[TokenLogprobs | None]:
    """The chosen token's logprob and rank and the top-n list of each row (None where
    `num_top` is None).

    raw_logprobs: [num_rows, vocab_size]; token_ids: [num_rows].
    """
    chosen = raw_logprobs.gather(1, token_ids.unsqueeze(1))  # [num_rows, 1]
    ranks = ((raw_logprobs > chosen).sum(dim=-1) + 1).tolist()  # [num_rows]
    max_top = min(max((n or 0 for n in num_top), default=0), raw_logprobs.shape[1])
    top_values, top_ids = raw_logprobs.topk(max_top, dim=-1)  # [num_rows, max_top], sorted
    # One transfer each, not one per row: on a GPU every .tolist() is a sync.
    chosen_list, ids_list = chosen.squeeze(1).tolist(), token_ids.tolist()
    top_values_list, top_ids_list = top_values.tolist(), top_ids.tolist()
    result: list[TokenLogprobs | None] = []
    for row, n in enumerate(num_top):
        if n is None:
            result.append(None)
            continue
        top = list(zip(top_ids_list[row][:n], top_values_list[row][:n], strict=True))
        result.append(TokenLogprobs(ids_list[row], chosen_list[row], ranks[row], top))
    return result
