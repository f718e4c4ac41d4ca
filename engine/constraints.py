"""Per-request constraints on the next token: logit_bias, allowed_token_ids, bad_words and
grammar masks, applied to a batch's logits in place, each as one batched operation over
the rows that have it (rows without constraints are never touched or copied).

Semantics, per row r (as vLLM's sampler, which applies them before the penalties):

    l[r, t] += logit_bias[t]                                  for t in logit_bias
    l[r, t] = -inf   for t not in allowed_token_ids           (when given)
    l[r, w[-1]] = -inf   for each bad word w whose w[:-1] ends the output
    l[r, t] = -inf   where the grammar's bitmask bit t is 0   (structured output)

A row whose every token ends up -inf fails alone (the sampler's NO_TOKEN_LEFT).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from loraserve.engine.sampling_params import SamplingParams


class OutputTokens(Protocol):
    """A row's generated tokens (the sampler's `TokenHistory`)."""

    @property
    def output_token_ids(self) -> Sequence[int]: ...


@dataclass
class GrammarMasks:
    """Grammar bitmasks of some rows of a batch."""

    rows: list[int]
    """Batch rows with a grammar, in the order of `bitmask`'s rows."""
    bitmask: torch.Tensor
    """[len(rows), ceil(vocab / 32)] int32: bit t % 32 of word t // 32 set = token t allowed."""


_BIT_VALUES = (torch.ones(32, dtype=torch.int64) << torch.arange(32)).to(torch.int32)  # [32]
"""1 << b for each bit b of an int32 word (bit 31 wraps to the sign bit, as in the mask)."""


def apply_constraints(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[OutputTokens],
    grammar: GrammarMasks | None = None,
) -> None:
    """Every row's constraints, in place. logits: [num_seqs, vocab_size] float32;
    histories: each row's generated tokens so far (read only for rows with bad words)."""
    _add_logit_bias(logits, params)
    _keep_allowed(logits, params)
    _ban_bad_words(logits, params, histories)
    if grammar is not None and grammar.rows:
        _apply_bitmask(logits, grammar)


def _add_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    vocab_size = logits.shape[1]
    rows, tokens, values = [], [], []
    for row, p in enumerate(params):
        for token, bias in p.logit_bias.items():
            if token < vocab_size:
                rows.append(row)
                tokens.append(token)
                values.append(bias)
    if rows:
        index = (_long(rows, logits), _long(tokens, logits))
        logits.index_put_(index, torch.tensor(values, device=logits.device), accumulate=True)


def _keep_allowed(logits: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    rows = [row for row, p in enumerate(params) if p.allowed_token_ids is not None]
    if not rows:
        return
    vocab_size = logits.shape[1]
    keep = torch.zeros(len(rows), vocab_size, dtype=torch.bool, device=logits.device)
    positions, tokens = [], []
    for position, row in enumerate(rows):
        allowed = [t for t in params[row].allowed_token_ids or () if t < vocab_size]
        positions += [position] * len(allowed)
        tokens += allowed
    keep[_long(positions, logits), _long(tokens, logits)] = True  # [num_rows, vocab_size]
    index = _long(rows, logits)
    logits[index] = logits[index].masked_fill(~keep, float("-inf"))


def _ban_bad_words(
    logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[OutputTokens]
) -> None:
    vocab_size = logits.shape[1]
    rows, tokens = [], []
    for row, p in enumerate(params):
        if not p.bad_words_token_ids:
            continue
        output = histories[row].output_token_ids
        for word in p.bad_words_token_ids:
            prefix = word[:-1]
            ends_with_prefix = not prefix or (
                len(output) >= len(prefix) and list(output[len(output) - len(prefix) :]) == prefix
            )
            if ends_with_prefix and word[-1] < vocab_size:
                rows.append(row)
                tokens.append(word[-1])
    if rows:
        logits[_long(rows, logits), _long(tokens, logits)] = float("-inf")


def _apply_bitmask(logits: torch.Tensor, grammar: GrammarMasks) -> None:
    """-inf where a row's grammar bit is 0; bits past the mask's width count as 0."""
    num_rows, vocab_size = len(grammar.rows), logits.shape[1]
    bitmask = grammar.bitmask.to(logits.device)  # [num_rows, num_words]
    bits = bitmask.unsqueeze(-1) & _BIT_VALUES.to(logits.device)  # [num_rows, num_words, 32]
    allowed = bits.ne(0).flatten(1)[:, :vocab_size]  # [num_rows, <= vocab_size]
    if allowed.shape[1] < vocab_size:
        pad = torch.zeros(num_rows, vocab_size - allowed.shape[1], dtype=torch.bool)
        allowed = torch.cat([allowed, pad.to(logits.device)], dim=1)
    if grammar.rows == list(range(logits.shape[0])):  # every row: in place, no copies
        logits.masked_fill_(~allowed, float("-inf"))
        return
    index = _long(grammar.rows, logits)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


def _long(values: list[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=like.device)
