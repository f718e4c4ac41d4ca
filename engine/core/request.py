"""The one record of a request, from the route that accepts it to the step that runs it.

`EngineRequest` is built once, by the server's route or by `LLM.generate`, carried over
the IPC to the engine-core process as it is (a msgspec struct), and held by the core for
the request's life in its `RequestState`. A request of `n` completions is `n` records, one
per completion (`OutputProcessor.add_request` makes them), queued all or none.

The model runner learns of requests only from what it executes: each `Step` carries the
scheduler's plan, the requests that start with it and the ids of those that ended since
the last step (as vLLM's `SchedulerOutput.scheduled_new_reqs` / `finished_req_ids`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgspec

from loraserve.engine.core.outputs import TokenLogprobs
from loraserve.engine.core.sampling_params import SamplingParams
from loraserve.engine.sampling.structured import RequestGrammar
from loraserve.scheduler.request import SequenceState
from loraserve.scheduler.scheduler import ScheduledChunk, SchedulerOutput


class EngineRequest(msgspec.Struct):
    """One completion to generate: its tokens, its params, its adapter, who sent it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    """The adapter's name; None is the base model."""
    adapter_path: str | None = None
    """The adapter's folder, as the front end found it in the adapter dir; the engine
    registers the adapter from it if it does not know it yet."""
    tenant: str | None = None
    """The API key's tenant (fairness is per tenant); None is the anonymous tenant."""
    tenant_weight: float = 1.0
    """The tenant's share of service relative to others (the API-keys file's `weight`)."""
    cache_scope: str = ""
    """Who may reuse the KV blocks it caches, and whose it may reuse: requests of the same
    scope ("" is every request; the server scopes by tenant group and `cache_salt`)."""


@dataclass
class RequestState:
    """The core's side of a request: the record as admitted (`max_tokens` resolved) and its
    tokens (in `seq`, the scheduler's progress of it)."""

    request: EngineRequest
    seq: SequenceState
    stop_token_ids: frozenset[int]
    """Tokens that end it once `min_tokens` are out: its stop_token_ids, plus EOS unless ignored."""
    grammar: RequestGrammar | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """Prompt logprobs gathered so far, sent with the request's first output (then None)."""
    queued_at: float = field(default_factory=time.monotonic)
    """When the core queued it (`time.monotonic()`)."""
    scheduled_at: float | None = None
    """When a step first ran a chunk of it (its queue time ends, its prefill starts)."""

    @property
    def params(self) -> SamplingParams:
        return self.request.params


@dataclass
class Step:
    """What the runner executes: the plan, and the requests it starts and forgets first."""

    plan: SchedulerOutput
    started: list[RequestState] = field(default_factory=list)
    """Requests whose chunks may run from this step on (set up their sampling state)."""
    finished: list[str] = field(default_factory=list)
    """Requests the runner knew that ended since its last step (forget their state)."""


@dataclass(frozen=True, slots=True)
class ShardChunk:
    """A `ScheduledChunk` as a tensor-parallel rank is sent it: what the runner reads to
    build its batch (scheduler.PlannedChunk), its own tokens only, not its sequence's."""

    num_tokens: int
    start: int
    samples: bool
    slot: int
    token_ids: list[int]
    block_table: list[int]

    @classmethod
    def of(cls, chunk: ScheduledChunk) -> ShardChunk:
        return cls(
            chunk.num_tokens, chunk.start, chunk.samples, chunk.slot, chunk.token_ids,
            chunk.block_table,
        )  # fmt: skip

    @property
    def first_token(self) -> int:
        return self.token_ids[0]


@dataclass
class ShardStep:
    """What a tensor-parallel rank other than 0 executes of a step besides its adapter copies
    (sent apart: each rank its own slabs): the chunks, and the prompt-logprob rows whose
    logits the batch adds (so that every rank's batch has rank 0's shapes). Rank 0 samples."""

    chunks: list[ShardChunk]
    extra_logits: list[int]
    """Flat token indices of the prompt-logprob rows, after the sampling rows."""
