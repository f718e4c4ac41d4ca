"""The scheduler's view of the page pool: counts and page ids, no tensors.

The scheduler decides *which* requests run and *how many* pages they hold; the
pool's bookkeeping (memory/pool.py, `UnifiedPool`) owns the free list, adapter
residency and the prefix cache, and implements this protocol. Keeping the seam a
Protocol of counts and page ids is what lets the scheduler be tested with a fake pool
and no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from loraserve.scheduler.request import SequenceState


class PoolAccounting(Protocol):
    """What the scheduler may ask of, and do to, the unified page pool."""

    @property
    def block_size(self) -> int:
        """Tokens per KV page."""
        ...

    @property
    def num_total_pages(self) -> int:
        """Pages in the pool (KV and adapters together)."""
        ...

    def can_allocate(
        self, num_pages: int, adapter: str | None = None, cached: Sequence[int] = ()
    ) -> bool:
        """Whether `num_pages` KV pages, plus the pages of `adapter` if it is not
        resident yet, can be had now, i.e. after `acquire_cached(seq, cached)`,
        `acquire_adapter(adapter)` then `allocate(num_pages)`. Idle resident adapters and
        idle cached blocks count as reclaimable, except `adapter` itself and the `cached`
        prefix: acquiring them pins them, so their pages cannot also serve as new KV."""
        ...

    def cached_prefix(self, seq: SequenceState) -> list[int]:
        """Pages holding the KV of the longest chain of full blocks that starts `seq`'s
        tokens under its adapter, at most all but its last token ([] with prefix caching
        off, or for a request that computes every token). `seq`'s adapter must be ready."""
        ...

    def acquire_cached(self, seq: SequenceState, pages: list[int]) -> list[int]:
        """Admit `seq` reading `pages` (its `cached_prefix`, found this step): they are
        shared, not reclaimable while it runs. Returns them, for its block table."""
        ...

    def cache_full_blocks(self, seq: SequenceState, start: int) -> None:
        """`seq` computed its tokens from `start` to `num_computed_tokens` this step: the
        blocks that became full may be found by later requests."""
        ...

    def adapter_ready(self, adapter: str | None) -> bool:
        """Whether `acquire_adapter(adapter)` can make it resident now: it is resident, or
        its weights are in host RAM. False while it is being read from disk (the engine
        started that read); the base model (None) is always ready."""
        ...

    def allocate(self, num_pages: int) -> list[int]:
        """Take `num_pages` KV pages, reclaiming idle adapters and cached blocks (LRU) if needed.
        Raises `MemoryError` if they cannot be had (call `can_allocate` first)."""
        ...

    def free(self, pages: list[int]) -> None:
        """A request lets go of its KV pages: cached ones stay cached (reclaimable once no
        running request reads them), the others return to the free list."""
        ...

    def acquire_adapter(self, adapter: str | None) -> None:
        """Hold `adapter` for one more running request, making it resident (pages and
        a slot reserved now, its copy handed out by `take_loads`). None is a no-op."""
        ...

    def release_adapter(self, adapter: str | None) -> None:
        """Unpin `adapter` for one request; it stays resident until evicted."""
        ...

    def prefetch_adapter(self, adapter: str | None) -> bool:
        """Start bringing a waiting request's ready adapter into free pages ahead of its
        admission, never evicting anything; it stays idle (reclaimable) until acquired.
        False if nothing was started (resident already, not ready, or no free room)."""
        ...

    def slot_of(self, adapter: str | None) -> int:
        """The table row a resident `adapter` occupies (an opaque int to the scheduler;
        the base model has its own). Chunks of one adapter are grouped by it."""
        ...

    def take_loads(self) -> list[Any]:
        """Weight copies decided since the last call (adapters made resident), handed
        out once each; the scheduler passes them to the runner in its plan."""
        ...
