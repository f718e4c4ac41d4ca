"""Logprobs of prompt tokens (`prompt_logprobs`; completions `echo` with `logprobs`, which
lm-evaluation-harness's log-likelihood tasks read).

The logits at position p predict token p + 1, so prompt token j >= 1 takes its logprob
from the logits of position j - 1 (token 0 has none). The forward pass normally keeps
only the last position of each sampling chunk; for a request with `prompt_logprobs`
the runner asks it for extra rows: the positions p of each of its chunks with
p + 1 < num_prompt_tokens that were not reported yet.

Exactly once per prompt token: chunked prefill runs disjoint positions, and a request
preempted and recomputed runs its prompt again, so each request keeps the first
position not yet reported (`PromptProgress.next_position`) and later chunks skip what
lies before it.

Worked example, prompt of 5 tokens [a b c d e], chunks of 3 then 2:
    chunk 1 positions 0 1 2 -> rows for p = 0, 1, 2: logprobs of b, c, d
    chunk 2 positions 3 4   -> row for p = 3: logprob of e (p = 4 samples the first output)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from loraserve.engine.core.outputs import TokenLogprobs
from loraserve.engine.sampling.sampler import gather_logprobs
from loraserve.scheduler.scheduler import ScheduledChunk


@dataclass
class PromptProgress:
    """A request's prompt logprobs: how many top alternatives, and where it stands."""

    num_top: int
    next_position: int = 0
    """First position whose logits have not been reported (its logprob is of token p + 1)."""


@dataclass
class PromptRows:
    """The extra logits rows of one step, one per reported prompt position."""

    flat_indices: list[int] = field(default_factory=list)
    """Index of the row's position in the step's flat token batch."""
    request_ids: list[str] = field(default_factory=list)
    next_tokens: list[int] = field(default_factory=list)
    """The prompt token each row's logits are scored on."""
    num_top: list[int | None] = field(default_factory=list)


def plan_prompt_rows(
    chunks: Sequence[ScheduledChunk], progress: Mapping[str, PromptProgress]
) -> PromptRows:
    """The rows this step must add, advancing each request's progress past them."""
    rows = PromptRows()
    offset = 0
    for chunk in chunks:
        seq = chunk.seq
        state = progress.get(seq.request_id)
        if state is not None:
            first = max(chunk.start, state.next_position)
            end = min(chunk.start + chunk.num_tokens, seq.num_prompt_tokens - 1)
            for position in range(first, end):
                rows.flat_indices.append(offset + position - chunk.start)
                rows.request_ids.append(seq.request_id)
                rows.next_tokens.append(seq.token_ids[position + 1])
                rows.num_top.append(state.num_top)
            state.next_position = max(state.next_position, end)
        offset += chunk.num_tokens
    return rows


def gather_prompt_logprobs(
    logits: torch.Tensor, rows: PromptRows
) -> dict[str, list[TokenLogprobs]]:
    """Request id -> the logprobs of its rows, in position order.

    logits: [len(rows.flat_indices), vocab_size] float32, the rows' raw logits."""
    if not rows.flat_indices:
        return {}
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [num_rows, vocab_size]
    tokens = torch.tensor(rows.next_tokens, device=logits.device)  # [num_rows]
    result: dict[str, list[TokenLogprobs]] = {}
    entries = gather_logprobs(logprobs, tokens, rows.num_top)
    for request_id, entry in zip(rows.request_ids, entries, strict=True):
        assert entry is not None
        result.setdefault(request_id, []).append(entry)
    return result
