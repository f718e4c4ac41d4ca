"""Build the sampler's rows from plain lists, as the model runner's `SamplingBatch` would:
one fresh batch per call, request ids by row, each row's tokens so far counted."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from loraserve.engine.core.sampling_params import SamplingParams
from loraserve.engine.sampling.sampling_batch import SamplingBatch
from loraserve.engine.sampling.sampling_rows import SamplingRows


@dataclass
class SequenceTokens:
    """A sequence's tokens (the scheduler's `SequenceState`, without the rest)."""

    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    request_id: str = ""


def rows_of(
    params: Sequence[SamplingParams],
    vocab_size: int,
    histories: Sequence[SequenceTokens] | None = None,
    eos_token_ids: Sequence[int] = (),
) -> SamplingRows:
    """The rows of a step that samples `params[i]` at row i, whose sequence so far is
    `histories[i]` (empty by default)."""
    batch = SamplingBatch(len(params), vocab_size, eos_token_ids, torch.device("cpu"))
    seqs = []
    for row, p in enumerate(params):
        history = histories[row] if histories is not None else SequenceTokens([])
        seqs.append(SequenceTokens(history.prompt_token_ids, history.output_token_ids, str(row)))
        batch.add(str(row), p)
    return batch.rows(seqs)
