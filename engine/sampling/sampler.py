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

Per-row state lives in a `SamplingBatch` (engine/sampling/sampling_batch.py): each request's
parameters, prepared once, and its token counts, kept as tokens are drawn; a step passes
the sampler the view of its rows (`SamplingRows`), so every stage is one batched operation
over the rows that need it. A request with a seed has its own `torch.Generator`, so its
draws depend on nothing else in the batch; requests without one share the default
generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from loraserve.engine.core.outputs import TokenLogprobs
from loraserve.engine.sampling.constraints import GrammarMasks, apply_constraints
from loraserve.engine.sampling.sampling_rows import (
    FREQUENCY,
    MIN_P,
    PRESENCE,
    REPETITION,
    TEMPERATURE,
    TOP_K,
    TOP_P,
    PenalizedRows,
    SampledRows,
    SamplingRows,
)

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


def sample(
    logits: torch.Tensor, rows: SamplingRows, grammar: GrammarMasks | None = None
) -> SamplerOutput:
    """Choose one token per row of `logits`.

    logits: [num_seqs, vocab_size], any float dtype; not modified.
    rows: the step's rows of the sampling batch, one per row of `logits`.
    grammar: the allowed-token bitmasks of the rows with structured output.
    """
    num_seqs = logits.shape[0]
    assert rows.num_rows == num_seqs
    logits = logits.to(torch.float32, copy=True)  # [num_seqs, vocab_size]
    raw_logprobs = None
    if rows.num_top is not None:
        raw_logprobs = torch.log_softmax(logits, dim=-1)  # [num_seqs, vocab_size]

    apply_constraints(logits, rows.constrained, grammar)
    if rows.penalized is not None:
        apply_penalties(logits, rows.penalized)
    if rows.min_tokens_stops is not None:  # EOS and stop ids of rows short of min_tokens
        logits[rows.min_tokens_stops] = float("-inf")
    failure_codes = _failure_codes(logits)  # [num_seqs]

    token_ids = logits.argmax(dim=-1)  # [num_seqs]; kept for the greedy rows
    if rows.sampled is not None:
        index = rows.sampled.index
        probs = _sampling_probs(logits[index], rows.sampled)
        # A row whose probabilities broke down anyway draws from a stand-in, so that
        # multinomial never raises; its failure code is already set.
        broken = ~torch.isfinite(probs).all(dim=-1) | ~(probs.sum(dim=-1) > 0)  # [num_rows]
        failure_codes[index] = torch.where(
            broken & (failure_codes[index] == 0), _NOT_FINITE_CODE, failure_codes[index]
        )
        probs[broken] = 1.0
        token_ids[index] = _draw(probs, rows.sampled)
    logprobs: list[TokenLogprobs | None] = [None] * num_seqs
    if raw_logprobs is not None and rows.num_top is not None:
        logprobs = gather_logprobs(raw_logprobs, token_ids, rows.num_top)
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


def apply_penalties(logits: torch.Tensor, penalized: PenalizedRows) -> None:
    """Repetition, frequency and presence penalties of the penalized rows, in place.

    Semantics, for row r with penalties (rep, freq, pres) and output counts c[t]:
        for t in set(prompt + output): l[t] = l[t] / rep if l[t] > 0 else l[t] * rep
        l[t] -= freq * c[t] + pres * (c[t] > 0)
    logits: [num_seqs, vocab_size] float32.
    """
    values = penalized.values  # [num_penalized, NUM_VALUES]
    counts = penalized.output_counts  # [num_penalized, vocab_size]
    seen = penalized.in_prompt | (counts > 0)  # [num_penalized, vocab_size]
    rows = logits[penalized.index]  # [num_penalized, vocab_size]
    repetition = values[:, REPETITION : REPETITION + 1]  # [num_penalized, 1]
    repeated = torch.where(rows > 0, rows / repetition, rows * repetition)
    rows = torch.where(seen, repeated, rows)
    frequency = values[:, FREQUENCY : FREQUENCY + 1]  # [num_penalized, 1]
    presence = values[:, PRESENCE : PRESENCE + 1]  # [num_penalized, 1]
    # Only tokens in the output change: a row without these penalties keeps its bits.
    logits[penalized.index] = torch.where(counts > 0, rows - (frequency * counts + presence), rows)


def _sampling_probs(logits: torch.Tensor, sampled: SampledRows) -> torch.Tensor:
    """Temperature, top_k, top_p and min_p for rows that sample; returns probabilities.

    logits: [num_rows, vocab_size] float32 (a copy, changed freely). Returns the same shape.
    """
    values = sampled.values  # [num_rows, NUM_VALUES]
    logits = logits / values[:, TEMPERATURE : TEMPERATURE + 1]
    if sampled.filters_top_k_top_p:
        top_k = values[:, TOP_K].long()  # [num_rows]; clamped to the vocabulary when prepared
        logits = _apply_top_k_top_p(logits, top_k, values[:, TOP_P])
    probs = torch.softmax(logits, dim=-1)  # [num_rows, vocab_size]
    if sampled.filters_min_p:
        threshold = values[:, MIN_P : MIN_P + 1] * probs.max(dim=-1, keepdim=True).values
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


def _draw(probs: torch.Tensor, sampled: SampledRows) -> torch.Tensor:
    """One multinomial draw per row; seeded rows each from their own generator.

    probs: [num_rows, vocab_size]. Returns [num_rows] token ids.
    """
    drawn = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    if len(sampled.unseeded):  # one call for all of them: they share the default generator
        rows = sampled.unseeded
        drawn[rows] = torch.multinomial(probs[rows], num_samples=1).squeeze(1)
    for row, generator in sampled.seeded:
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
