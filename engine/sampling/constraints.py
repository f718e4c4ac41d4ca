"""Per-request constraints on the next token: logit_bias, allowed_token_ids, bad_words and
grammar masks, applied to a batch's logits in place, each as one batched operation over
the rows that have it (rows without constraints are never touched or copied).

Semantics, per row r (as vLLM's sampler, which applies them before the penalties):

    l[r, t] += logit_bias[t]                                  for t in logit_bias
    l[r, t] = -inf   for t not in allowed_token_ids           (when given)
    l[r, w[-1]] = -inf   for each bad word w whose w[:-1] ends the output
    l[r, t] = -inf   where the grammar's bitmask bit t is 0   (structured output)

Token ids past the model's vocabulary are dropped when a request's constraints are
prepared (`RequestConstraints.of`, once per request); a row whose every token ends up
-inf fails alone (the sampler's NO_TOKEN_LEFT).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from loraserve.engine.core.sampling_params import SamplingParams


@dataclass(frozen=True)
class RequestConstraints:
    """One request's token constraints, prepared once (ids within the vocabulary only)."""

    bias_tokens: np.ndarray
    """[num_biased] int64: the tokens of `logit_bias`."""
    bias_values: np.ndarray
    """[num_biased] float32: what is added to each."""
    allowed_tokens: np.ndarray | None
    """[num_allowed] int64, or None when every token is allowed (an empty array allows none)."""
    bad_words: list[list[int]]
    """The bad words whose last token can be banned."""

    @staticmethod
    def of(params: SamplingParams, vocab_size: int) -> RequestConstraints | None:
        """The constraints of `params`, or None when it has none."""
        if not (
            params.logit_bias or params.allowed_token_ids is not None or params.bad_words_token_ids
        ):
            return None
        biased = [(token, bias) for token, bias in params.logit_bias.items() if token < vocab_size]
        allowed = None
        if params.allowed_token_ids is not None:
            allowed = _int64([token for token in params.allowed_token_ids if token < vocab_size])
        return RequestConstraints(
            bias_tokens=_int64([token for token, _ in biased]),
            bias_values=np.array([bias for _, bias in biased], dtype=np.float32),
            allowed_tokens=allowed,
            bad_words=[word for word in params.bad_words_token_ids if word[-1] < vocab_size],
        )

    def banned_now(self, output_token_ids: Sequence[int]) -> list[int]:
        """The last token of each bad word whose other tokens end the output."""
        banned = []
        for word in self.bad_words:
            prefix = word[:-1]
            if not prefix or (
                len(output_token_ids) >= len(prefix)
                and list(output_token_ids[len(output_token_ids) - len(prefix) :]) == prefix
            ):
                banned.append(word[-1])
        return banned


@dataclass
class ConstrainedRow:
    """A row of one step that has constraints."""

    row: int
    constraints: RequestConstraints
    banned: list[int]
    """The tokens its bad words ban at this step."""


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
    constrained: Sequence[ConstrainedRow],
    grammar: GrammarMasks | None = None,
) -> None:
    """Every row's constraints, in place. logits: [num_seqs, vocab_size] float32;
    constrained: the rows with logit_bias, allowed_token_ids or bad words, in row order."""
    if constrained:
        _add_logit_bias(logits, constrained)
        _keep_allowed(logits, constrained)
        _ban_bad_words(logits, constrained)
    if grammar is not None and grammar.rows:
        _apply_bitmask(logits, grammar)


def _add_logit_bias(logits: torch.Tensor, constrained: Sequence[ConstrainedRow]) -> None:
    biased = [entry for entry in constrained if len(entry.constraints.bias_tokens)]
    if not biased:
        return
    rows = np.repeat(
        [entry.row for entry in biased], [len(e.constraints.bias_tokens) for e in biased]
    )
    tokens = np.concatenate([entry.constraints.bias_tokens for entry in biased])
    values = np.concatenate([entry.constraints.bias_values for entry in biased])
    index = (_long(rows, logits), _long(tokens, logits))
    logits.index_put_(index, torch.from_numpy(values).to(logits.device), accumulate=True)


def _keep_allowed(logits: torch.Tensor, constrained: Sequence[ConstrainedRow]) -> None:
    rows, allowed = [], []
    for entry in constrained:
        if entry.constraints.allowed_tokens is not None:
            rows.append(entry.row)
            allowed.append(entry.constraints.allowed_tokens)
    if not rows:
        return
    keep = torch.zeros(len(rows), logits.shape[1], dtype=torch.bool, device=logits.device)
    positions = np.repeat(np.arange(len(rows)), [len(tokens) for tokens in allowed])
    keep[_long(positions, logits), _long(np.concatenate(allowed), logits)] = True  # [rows, vocab]
    index = _long(np.array(rows), logits)
    logits[index] = logits[index].masked_fill(~keep, float("-inf"))


def _ban_bad_words(logits: torch.Tensor, constrained: Sequence[ConstrainedRow]) -> None:
    rows = [entry.row for entry in constrained for _ in entry.banned]
    if rows:
        tokens = [token for entry in constrained for token in entry.banned]
        logits[_long(np.array(rows), logits), _long(np.array(tokens), logits)] = float("-inf")


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
    index = _long(np.array(grammar.rows), logits)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


def _int64(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _long(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(values.astype(np.int64)).to(like.device)
