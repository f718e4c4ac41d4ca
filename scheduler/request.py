"""A request as the scheduler sees it: tokens known so far vs tokens whose KV is computed.

Prefill, chunked prefill, decode and recompute after preemption are one case: each
step computes some of the tokens in `token_ids[num_computed_tokens:]`; when a step
reaches the end of `token_ids`, the engine samples a token and appends it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class SequenceStatus(enum.Enum):
    """Where a request is. A preempted request goes back to WAITING (and is recomputed)."""

    WAITING = "waiting"
    RUNNING = "running"
    # The values of the finished states are OpenAI's `finish_reason`.
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self not in (SequenceStatus.WAITING, SequenceStatus.RUNNING)


@dataclass(eq=False)  # compared by identity: two requests with equal tokens are not one
class SequenceState:
    """One request's tokens and the pages that hold their KV.

    Example, block_size 4, prompt of 6 tokens, 2 generated, 7 computed:
    `token_ids` = [p0 p1 p2 p3 p4 p5 g0 g1], `num_prompt_tokens` = 6,
    `num_computed_tokens` = 7 (g1 is the next input), `block_table` = [page a, page b].
    """

    request_id: str
    adapter: str | None
    """Adapter name; None is the base model."""
    token_ids: list[int]
    """The prompt, then every generated token (they survive preemption)."""
    tenant: str | None = None
    """Who sent it (the API key's tenant); None is the anonymous tenant. Fairness is per tenant."""
    tenant_weight: float = 1.0
    """The tenant's share of service relative to others (the API-keys file's `weight`)."""
    cache_scope: str = ""
    """Who may reuse its cached KV blocks: requests of the same scope ("" is everyone)."""
    num_prompt_tokens: int = field(init=False)
    num_computed_tokens: int = 0
    """Tokens whose KV is in the pool; reset to 0 by preemption."""
    block_table: list[int] = field(default_factory=list)
    """Page ids of this request's KV, in token order: exactly ceil(num_computed_tokens / block_size)
    between steps."""
    status: SequenceStatus = SequenceStatus.WAITING
    reuse_cached_prefix: bool = True
    """Start after the longest cached prefix of its tokens (prefix caching); False computes
    every token (prompt logprobs need the logits of every prompt position)."""
    block_hashes: list[bytes] = field(default_factory=list)
    """Hashes of its first full blocks, kept by the pool's prefix cache (each computed once)."""
    block_hash_seed: bytes = b""
    """The adapter identity `block_hashes` were computed under."""
    arrival_index: int = -1
    """Order of arrival, stamped by `Scheduler.add`; the admission policies compare it."""
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError(f"request {self.request_id!r} has an empty prompt")
        self.token_ids = list(self.token_ids)  # ours to append to, not the caller's list
        if not self.tenant_weight > 0:
            raise ValueError(f"tenant_weight must be > 0, got {self.tenant_weight}")
        self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]
