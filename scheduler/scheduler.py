"""Continuous batching: which requests compute which tokens this step, and who holds pages.

One token budget per step. Running requests come first, in admission order: each
computes the rest of its known tokens (a decode is 1; a prefill is chunked by the
budget). When the pool cannot give a running request its next pages, the last
admitted running request is preempted (recompute: its pages are freed and it is
re-prefilled later, generated tokens included). Then waiting requests are admitted in
the admission policy's order (scheduler/policy.py: VTC fair share between tenants,
or FCFS) while budget, `max_num_seqs` and pages allow.

Adapters being read from disk: a waiting request whose adapter is not in host RAM or
the pool yet is skipped, keeping its place, and those behind it are offered instead;
it is offered again every step until its adapter is ready. Only that skips: a ready
request that does not fit the pool's free pages stops admission (head-of-line
blocking, so a long prompt is not starved by shorter ones behind it). Under VTC the
skipped request's tenant stays backlogged: its counter does not grow while it waits,
so once the adapter is in, that tenant is served first until its counter catches up.
Then the adapters of a few waiting requests are brought into free pool pages ahead of
admission (`max_adapter_prefetch`), so that their copies overlap this step.

Prefix caching: an admitted request first takes the longest chain of cached full
blocks that starts its tokens (`PoolAccounting.cached_prefix`; shared pages, computed
by earlier requests of the same adapter) and computes from there; after each step
the blocks that became full are offered to the cache. A preempted request keeps its
block hashes, so its recompute starts from what is still cached.

Example, budget 8, block_size 4, A decoding (10 tokens, 9 computed), B waiting
with a 12-token prompt:
    step 1: A 1 token (samples), B 7 tokens (prefill chunk, B takes 2 pages)
    step 2: A 1 token (samples), B 5 tokens (rest of prompt, samples; B has 3 pages)
    step 3: A 1, B 1 (both decode)

No torch here: the pool is reached only through `PoolAccounting`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Protocol

from loraserve.scheduler.config import SchedulerConfig
from loraserve.scheduler.interfaces import PoolAccounting
from loraserve.scheduler.policy import AdmissionPolicy, make_policy
from loraserve.scheduler.request import SequenceState, SequenceStatus

PREFETCH_LOOKAHEAD = 4
"""Waiting requests looked at per adapter that may be prefetched: bounds the walk when the
head of a long queue names adapters that are resident already."""


@dataclass(eq=False)
class ScheduledChunk:
    """`num_tokens` tokens of `seq` computed this step, from position `start`.

    `start` and `samples` are taken from `seq` when the chunk is made (in `schedule`),
    so they still describe this step after `update_after_step` has advanced `seq`.
    """

    seq: SequenceState
    num_tokens: int
    slot: int = 0
    """The adapter's table row in the pool (`PoolAccounting.slot_of`), set by `schedule`."""
    start: int = field(init=False)
    """`seq.num_computed_tokens` before this step: the position of the chunk's first token."""
    samples: bool = field(init=False)
    """Whether the chunk reaches the end of `seq.token_ids`, so a token is sampled after it."""

    def __post_init__(self) -> None:
        self.start = self.seq.num_computed_tokens
        self.samples = self.start + self.num_tokens == self.seq.num_tokens

    @property
    def token_ids(self) -> list[int]:
        """The chunk's input tokens."""
        return self.seq.token_ids[self.start : self.start + self.num_tokens]

    @property
    def first_token(self) -> int:
        """The chunk's first input token (a decode chunk's only one)."""
        return self.seq.token_ids[self.start]

    @property
    def block_table(self) -> list[int]:
        """Its sequence's pages, in token order."""
        return self.seq.block_table


class PlannedChunk(Protocol):
    """What the model runner reads of a chunk to build its batch: a `ScheduledChunk`, or
    the copy a tensor-parallel rank is sent (engine/core/request.ShardChunk)."""

    @property
    def num_tokens(self) -> int: ...
    @property
    def start(self) -> int: ...
    @property
    def samples(self) -> bool: ...
    @property
    def slot(self) -> int: ...
    @property
    def token_ids(self) -> list[int]: ...
    @property
    def first_token(self) -> int: ...
    @property
    def block_table(self) -> list[int]: ...


@dataclass
class SchedulerOutput:
    """One step's plan: the chunks in batch order, those of one adapter next to each other
    (ordered by slot), and the adapter weights to copy in before the forward pass."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    """Request ids preempted this step (back to waiting, their KV to be recomputed)."""
    adapter_loads: list[Any] = field(default_factory=list)
    """`PoolAccounting.take_loads()` after this step's admissions: copies the runner makes first."""

    @property
    def num_batched_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)

    @property
    def is_empty(self) -> bool:
        """Nothing to run and nothing to copy (a plan may carry only copies: a pin, or
        adapters brought in ahead of their requests)."""
        return not self.chunks and not self.adapter_loads


class Scheduler:
    """Continuous batching with chunked prefill and preemption by recompute.

    Invariants (tested): a running request pins its adapter exactly once and holds
    ceil(num_computed_tokens / block_size) pages between steps (as many as its
    scheduled chunk needs during one); waiting and finished requests hold nothing;
    with the FCFS policy and every adapter ready, running requests arrived before
    every waiting one.
    """

    def __init__(self, config: SchedulerConfig, pool: PoolAccounting) -> None:
        self.config = config
        self._pool = pool
        self._waiting: AdmissionPolicy = make_policy(
            config.policy, config.vtc_input_token_weight, config.vtc_output_token_weight
        )
        self._running: list[SequenceState] = []
        self._requests: dict[str, SequenceState] = {}  # every unfinished request, by id
        self._arrivals = count()

    # -- requests in and out -------------------------------------------------------------

    def add(self, seq: SequenceState) -> None:
        """Queue a new request. The engine has checked that it fits the pool alone
        (its longest KV plus its adapter's pages); one that does not would wait forever."""
        if seq.request_id in self._requests:
            raise ValueError(f"request id {seq.request_id!r} is already scheduled")
        if seq.status is not SequenceStatus.WAITING or seq.num_computed_tokens or seq.block_table:
            raise ValueError(f"request {seq.request_id!r} is not new (status {seq.status.name})")
        seq.arrival_index = next(self._arrivals)
        self._requests[seq.request_id] = seq
        self._waiting.add(seq)

    def abort(self, request_id: str) -> bool:
        """Drop a waiting or running request, freeing what it holds; False if unknown
        (already finished, say: a client may disconnect as its request ends)."""
        if request_id not in self._requests:
            return False
        self.finish(request_id, SequenceStatus.FINISHED_ABORTED)
        return True

    def finish(self, request_id: str, status: SequenceStatus) -> None:
        """End a request for `status` (the engine decides stops and lengths): its pages
        are freed and its adapter released. Raises KeyError for an unknown id."""
        if not status.is_finished:
            raise ValueError(f"finish needs a FINISHED_* status, got {status.name}")
        seq = self._requests.pop(request_id)
        was_running = seq.status is SequenceStatus.RUNNING
        seq.status = status
        if was_running:
            self._running.remove(seq)
            self._release(seq)
            self._waiting.on_finished(seq)
        else:
            self._waiting.remove(seq)  # waiting requests hold no pages and no pin

    # -- the step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Plan one step and take the pages it needs.

        Returns an empty output when nothing can run: nothing is waiting or running, or
        nothing runs and no waiting request can be admitted (their adapters are still
        being read from disk, or the pool is smaller than the first ready one: the
        engine rejects such requests before `add`).
        """
        output = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        # (1) Running requests, first admitted first: they already hold pages, and the
        # first always progresses (it may preempt every later one), so nothing livelocks.
        index = 0
        while index < len(self._running) and budget > 0:
            seq = self._running[index]
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            assert num_tokens > 0, f"running request {seq.request_id} has nothing to compute"
            if not self._grow_or_preempt(seq, num_tokens, output.preempted):
                break  # `seq` preempted itself: it was the last running request
            output.chunks.append(ScheduledChunk(seq, num_tokens))
            budget -= num_tokens
            index += 1
        # (2) Waiting requests, in the policy's order. Not after a preemption: the victim
        # would be readmitted into the pages it just lost and thrash.
        if not output.preempted:
            self._admit(output, budget)
        self._prefetch()
        return self._finish_plan(output)

    def update_after_step(
        self, output: SchedulerOutput, sampled: Mapping[str, int]
    ) -> list[SequenceState]:
        """Record that the step of `output` ran: each chunk's tokens are computed, and
        each sampling chunk's request gets its token from `sampled` (by request id).

        Returns the requests that got a token, in batch order, for the engine to check
        stop conditions and call `finish`. Chunks of requests aborted since `schedule`
        are skipped.
        """
        grown = []
        for chunk in output.chunks:
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed_tokens += chunk.num_tokens
            self._pool.cache_full_blocks(seq, chunk.start)
            if chunk.samples:
                seq.token_ids.append(sampled[seq.request_id])
                self._waiting.on_token(seq)
                grown.append(seq)
        return grown

    # -- counts for the engine and metrics -----------------------------------------------

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def num_waiting(self) -> int:
        return len(self._waiting)

    def num_running(self) -> int:
        return len(self._running)

    def is_full(self, num_incoming: int = 1) -> bool:
        """Whether `num_incoming` more requests would take the waiting queue past
        `max_waiting_requests` (refuse them)."""
        return len(self._waiting) + num_incoming > self.config.max_waiting_requests

    def running_adapters(self) -> list[str]:
        """Distinct adapters of running requests, sorted (the base model is not one)."""
        return sorted({seq.adapter for seq in self._running if seq.adapter is not None})

    def waiting_adapters(self) -> list[str]:
        """Distinct adapters of waiting requests, sorted (the base model is not one)."""
        return sorted({seq.adapter for seq in self._waiting if seq.adapter is not None})

    # -- internals -----------------------------------------------------------------------

    def _admit(self, output: SchedulerOutput, budget: int) -> None:
        """Admit waiting requests in the policy's order while budget, seats and pages allow;
        requests whose adapter is not ready are skipped (see the module docstring)."""
        if budget <= 0 or len(self._running) >= self.config.max_num_seqs:
            return  # the common saturated step: no need to walk the queue
        for seq in self._waiting.candidates():
            if budget <= 0 or len(self._running) >= self.config.max_num_seqs:
                return
            if not self._pool.adapter_ready(seq.adapter):
                continue
            cached = self._pool.cached_prefix(seq)
            num_cached = len(cached) * self._pool.block_size
            num_tokens = min(seq.num_tokens - num_cached, budget)
            num_pages = self._num_new_pages(seq, num_cached + num_tokens) - len(cached)
            if not self._pool.can_allocate(num_pages, seq.adapter, cached):
                return
            self._waiting.remove(seq)
            # Cached pages, then the adapter, then new pages: each pin reserves its pages
            # before the next may reclaim idle ones.
            seq.block_table.extend(self._pool.acquire_cached(seq, cached))
            seq.num_computed_tokens = num_cached
            self._pool.acquire_adapter(seq.adapter)
            seq.block_table.extend(self._pool.allocate(num_pages))
            seq.status = SequenceStatus.RUNNING
            self._running.append(seq)
            self._waiting.on_admitted(seq)
            output.chunks.append(ScheduledChunk(seq, num_tokens))
            budget -= num_tokens

    def _prefetch(self) -> None:
        """Bring the adapters of the first waiting requests into free pages (never evicting)."""
        remaining = self.config.max_adapter_prefetch
        for index, seq in enumerate(self._waiting):
            if remaining <= 0 or index >= PREFETCH_LOOKAHEAD * self.config.max_adapter_prefetch:
                return
            remaining -= self._pool.prefetch_adapter(seq.adapter)

    def _finish_plan(self, output: SchedulerOutput) -> SchedulerOutput:
        """Group the chunks by adapter (one LoRA segment each) and attach the step's loads."""
        for chunk in output.chunks:
            chunk.slot = self._pool.slot_of(chunk.seq.adapter)
        output.chunks.sort(key=lambda chunk: chunk.slot)  # stable: arrival order within a slot
        output.adapter_loads = self._pool.take_loads()
        return output

    def _num_new_pages(self, seq: SequenceState, num_tokens: int) -> int:
        """Pages `seq` lacks to hold the KV of its next `num_tokens` tokens."""
        block_size = self._pool.block_size
        needed = (seq.num_computed_tokens + num_tokens + block_size - 1) // block_size
        return needed - len(seq.block_table)

    def _grow_or_preempt(self, seq: SequenceState, num_tokens: int, preempted: list[str]) -> bool:
        """Give running `seq` the pages for `num_tokens` more tokens, preempting the
        last admitted running requests until they fit. False if `seq` itself was
        preempted (it was the latest left). Victims always come after `seq` in
        `_running`, so none of them was scheduled earlier in this step."""
        num_pages = self._num_new_pages(seq, num_tokens)
        if num_pages <= 0:
            return True  # most decode steps: the last page has room
        while not self._pool.can_allocate(num_pages):
            victim = self._running.pop()
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is seq:
                return False
        seq.block_table.extend(self._pool.allocate(num_pages))
        return True

    def _preempt(self, seq: SequenceState) -> None:
        """Back to the front of its line in waiting, holding nothing; its KV is recomputed
        later."""
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self._waiting.requeue(seq)

    def _release(self, seq: SequenceState) -> None:
        """Free a running request's pages and unpin its adapter."""
        self._pool.free(seq.block_table)
        seq.block_table = []
        self._pool.release_adapter(seq.adapter)
