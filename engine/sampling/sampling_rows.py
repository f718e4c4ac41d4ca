"""One step's view of the `SamplingBatch`: the rows the step samples, in plan order, with
what each stage of the sampler reads, gathered by index tensors (no loop over rows).

Row r of the step is slot `slots[r]` of the batch. A stage that only some rows need (the
draw, the penalties, `min_tokens`, constraints, grammar, logprobs) gets the positions of
those rows and their values; a step where no row needs it gets None or nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from loraserve.engine.core.sampling_params import SamplingParams
from loraserve.engine.sampling.constraints import ConstrainedRow
from loraserve.engine.sampling.structured import RequestGrammar

TEMPERATURE, TOP_K, TOP_P, MIN_P, REPETITION, FREQUENCY, PRESENCE = range(7)
NUM_VALUES = 7
"""Columns of a slot's scalar parameters (float32; top_k, clamped to the vocabulary, is exact)."""


def slot_values(params: SamplingParams, vocab_size: int) -> list[float]:
    """A request's scalar parameters, in column order."""
    return [
        params.temperature,
        min(params.effective_top_k, vocab_size),  # 0 = off
        params.top_p,
        params.min_p,
        params.repetition_penalty,
        params.frequency_penalty,
        params.presence_penalty,
    ]


@dataclass
class SampledRows:
    """The rows that draw their token (not greedy)."""

    index: torch.Tensor
    """[num_sampled] long: their rows."""
    values: torch.Tensor
    """[num_sampled, NUM_VALUES] float32: their parameters."""
    filters_top_k_top_p: bool
    """Whether any of them has top_k or top_p."""
    filters_min_p: bool
    """Whether any of them has min_p."""
    unseeded: torch.Tensor
    """[num_unseeded] long: positions among the sampled rows that share the default generator."""
    seeded: list[tuple[int, torch.Generator]]
    """(position among the sampled rows, its request's own generator)."""


@dataclass
class PenalizedRows:
    """The rows with a repetition, frequency or presence penalty."""

    index: torch.Tensor
    """[num_penalized] long: their rows."""
    values: torch.Tensor
    """[num_penalized, NUM_VALUES] float32: their parameters."""
    output_counts: torch.Tensor
    """[num_penalized, vocab_size] int32: how often each token is in their output so far."""
    in_prompt: torch.Tensor
    """[num_penalized, vocab_size] bool: which tokens their prompt holds."""


@dataclass
class SamplingRows:
    """What the sampler needs of one step's rows."""

    num_rows: int
    slots: np.ndarray
    """[num_rows] int64: each row's slot in the batch."""
    slot_index: torch.Tensor
    """[num_rows] long: the same, on the device."""
    sampled: SampledRows | None
    penalized: PenalizedRows | None
    min_tokens_stops: tuple[torch.Tensor, torch.Tensor] | None
    """(rows, token ids) [num_pairs] each: EOS and stop ids of rows short of min_tokens."""
    constrained: list[ConstrainedRow]
    """Rows with logit_bias, allowed_token_ids or bad words, in row order."""
    grammars: list[tuple[int, RequestGrammar]]
    """(row, grammar) of the rows with structured output, in row order."""
    num_top: list[int | None] | None
    """Each row's `logprobs` (None: none for it); None when no row asks."""


def flatten(rows: np.ndarray, lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(row repeated once per item, the items) of each row's list, as two int64 arrays."""
    lengths = [len(items) for items in lists]
    repeated = np.repeat(rows.astype(np.int64), lengths)
    items = np.fromiter((item for items in lists for item in items), np.int64, sum(lengths))
    return repeated, items


def to_device(arrays: Sequence[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """int64 host arrays to long device tensors in one copy (on a GPU each copy waits)."""
    flat = torch.from_numpy(np.concatenate([a.astype(np.int64) for a in arrays]))
    return list(flat.to(device).split([len(a) for a in arrays]))
