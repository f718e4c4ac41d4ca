"""The unified page pool's bookkeeping: which pages hold KV, which hold adapters, which are free.

Pure Python (no torch): the pool tensor itself, its KV view and the LoRA offset
tables belong to the model runner (engine/runner/device_pool.py), which copies what this
bookkeeping decides. `UnifiedPool` is the scheduler's `PoolAccounting`.

Residency: an adapter is held while any running request uses it; an idle resident
adapter stays (a later request finds it loaded) and joins the reclaimable set
(memory/reclaimable.py): when pages or slots are needed, the least recently used
reclaimable holder goes first. A pinned adapter (`pin_adapter`) is never reclaimed.
Making an adapter resident takes its weights from host RAM (the catalog's tier): it
reserves its pages and a slot (a row of the runner's offset tables) at once and
queues an `AdapterLoad`; the scheduler hands the step's loads to the runner in its
plan, so weights are copied before the forward pass that first reads them (on CUDA,
on a side stream that the forward waits for only if it uses the adapter).

Loads start in two ways: when a waiting request is admitted (`acquire_adapter`), or
ahead of it (`prefetch_adapter`: into free pages only, never evicting; the adapter
is then idle and reclaimable like any other). A load whose request is aborted or
preempted is kept: the adapter stays resident, idle and reclaimable, in LRU order;
if its pages are reclaimed before the runner got the load, the copy is dropped.

Prefix caching (memory/prefix_cache.py): full KV blocks stay cached after their
requests end; cached blocks that nothing running reads are reclaimable too, under the
same one order as idle adapters (key ("kv_block", hash)). A request's pages are
`cached_prefix` (found, then `acquire_cached`) followed by pages of its own (`allocate`).

Invariant (tested after every step): KV pages (in use or cached) + adapter pages + free
pages == total, each page counted once, reference counts never negative.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from loraserve.errors import UnknownAdapterError
from loraserve.kernels.constants import NO_ADAPTER
from loraserve.memory.allocator import PageAllocator
from loraserve.memory.prefix_cache import (
    BASE_MODEL_IDENTITY,
    KV_BLOCK,
    CachedSequence,
    PrefixCache,
    scoped,
)
from loraserve.memory.reclaimable import ReclaimableKey, ReclaimableSet
from loraserve.memory.residency import AdapterLoad, HostTier, PoolStats, ResidentAdapter

ADAPTER = "adapter"
"""The reclaimable kind of an idle resident adapter: key ("adapter", name)."""


class UnifiedPool:
    """Pages of the pool (KV blocks and adapter slabs alike) and adapter residency."""

    def __init__(
        self,
        num_pages: int,
        block_size: int,
        max_resident_adapters: int,
        adapters: HostTier,
        on_evict: Callable[[str], None] = lambda name: None,
        enable_prefix_caching: bool = True,
    ) -> None:
        self.allocator = PageAllocator(num_pages)
        self._block_size = block_size
        self.adapters = adapters
        self.on_evict = on_evict
        """Called with an adapter's name when its pages are reclaimed."""
        self.max_resident_adapters = max_resident_adapters
        self._free_slots = list(range(max_resident_adapters - 1, -1, -1))
        self._resident: dict[str, ResidentAdapter] = {}
        self.reclaimable = ReclaimableSet()
        """Idle page holders, least recently used first (the one eviction order)."""
        self._pending_loads: list[AdapterLoad] = []
        self.prefix_cache = (
            PrefixCache(block_size, self.reclaimable) if enable_prefix_caching else None
        )
        self._num_kv_allocated = 0  # KV pages off the free list: in use or cached idle
        self.stats = PoolStats()

    # -- the scheduler's view (PoolAccounting) -------------------------------------------

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_total_pages(self) -> int:
        return self.allocator.num_pages

    def can_allocate(
        self, num_pages: int, adapter: str | None = None, cached: Sequence[int] = ()
    ) -> bool:
        free = self.allocator.num_free
        resident = adapter is None or adapter in self._resident
        if resident and num_pages <= free:
            return True  # the common case (a decode step), without looking further
        # The request's own adapter and cached prefix are not reclaimable: it pins them.
        own = 0 if adapter is None else self.reclaimable.pages_of((ADAPTER, adapter))
        if cached and self.prefix_cache is not None:
            own += self.prefix_cache.num_idle(cached)
        available = free + self.reclaimable.num_pages - own
        if resident:
            return num_pages <= available
        if not self._free_slots and not self.reclaimable.count(ADAPTER):
            return False
        assert adapter is not None
        return num_pages + self.adapters.host(adapter).num_pages <= available

    def adapter_ready(self, adapter: str | None) -> bool:
        return adapter is None or adapter in self._resident or self.adapters.in_host(adapter)

    def allocate(self, num_pages: int) -> list[int]:
        self._reclaim(num_pages)
        pages = self.allocator.allocate(num_pages)
        self._num_kv_allocated += num_pages
        return pages

    def free(self, pages: list[int]) -> None:
        if self.prefix_cache is not None:
            pages = self.prefix_cache.release(pages)  # cached ones stay, idle at 0 readers
        self.allocator.free(pages)
        self._num_kv_allocated -= len(pages)

    def cached_prefix(self, seq: CachedSequence) -> list[int]:
        """Pages of the longest cached chain of full blocks that starts `seq`'s tokens under
        its adapter and its cache scope (never all its tokens); empty when caching is off or `seq` asks to
        compute every token. Its adapter must be ready (`adapter_ready`)."""
        cache = self.prefix_cache
        if cache is None:
            return []
        identity = scoped(self._identity(seq.adapter), seq.cache_scope)
        if not seq.reuse_cached_prefix:
            cache.block_hashes(seq, identity, 0)  # its own blocks are cached under it
            return []
        return cache.lookup(seq, identity)

    def acquire_cached(self, seq: CachedSequence, pages: list[int]) -> list[int]:
        """`seq` is admitted reading `pages` (its `cached_prefix`): take them before its
        adapter and new pages, so that reclaiming room for those cannot take them."""
        if self.prefix_cache is None:
            return []
        if seq.reuse_cached_prefix:
            self.stats.prefix_cache_queries += len(seq.token_ids)
            self.stats.prefix_cache_hits += len(pages) * self._block_size
        self.prefix_cache.acquire(pages)
        return list(pages)

    def cache_full_blocks(self, seq: CachedSequence, start: int) -> None:
        """`seq` computed its tokens from `start` to `num_computed_tokens` this step: cache
        the blocks that became full (a decode step mostly finds none: two divisions)."""
        first, end = start // self._block_size, seq.num_computed_tokens // self._block_size
        if self.prefix_cache is not None and end > first:
            self.prefix_cache.register(seq, first, end)

    def acquire_adapter(self, adapter: str | None) -> None:
        if adapter is None:
            return
        resident = self._resident.get(adapter)
        if resident is None:
            resident = self._make_resident(adapter, evict=True)
        resident.num_users += 1
        self.reclaimable.discard((ADAPTER, adapter))
        self.adapters.touch(adapter)

    def release_adapter(self, adapter: str | None) -> None:
        if adapter is None:
            return
        resident = self._resident[adapter]
        assert resident.num_users > 0, f"adapter {adapter} released more than acquired"
        resident.num_users -= 1
        if not resident.num_users and not resident.pinned:
            self.reclaimable.add((ADAPTER, adapter), len(resident.pages))

    def prefetch_adapter(self, adapter: str | None) -> bool:
        if adapter is None or adapter in self._resident or not self.adapters.in_host(adapter):
            return False
        if not self._free_slots or self.adapters.host(adapter).num_pages > self.allocator.num_free:
            return False
        resident = self._make_resident(adapter, evict=False)
        self.reclaimable.add((ADAPTER, adapter), len(resident.pages))
        return True

    def slot_of(self, adapter: str | None) -> int:
        """The offset-table row of a resident adapter; NO_ADAPTER for the base model."""
        return NO_ADAPTER if adapter is None else self._resident[adapter].slot

    def take_loads(self) -> list[AdapterLoad]:
        """The copies decided since the last call, for the runner to make before its next
        forward pass; each is handed out once."""
        loads, self._pending_loads = self._pending_loads, []
        self.stats.adapter_loads += len(loads)
        return loads

    # -- pins, lookups for the engine and metrics ----------------------------------------

    def pin_adapter(self, adapter: str) -> None:
        """Keep `adapter` resident until unregistered (its weights must be in host RAM if it
        is not resident yet). MemoryError if its pages cannot be had now, or if it would
        take the last slot that other adapters could use (their requests would never run)."""
        resident = self._resident.get(adapter)
        if resident is not None and resident.pinned:
            return
        if len(self.pinned_adapters()) + 1 >= self.max_resident_adapters:
            raise MemoryError(
                f"pinning it would leave none of the {self.max_resident_adapters} adapter slots "
                "to the other adapters (raise --max-resident-adapters)"
            )
        if resident is None:
            needed = self.adapters.host(adapter).num_pages
            if needed > self.allocator.num_free + self.reclaimable.num_pages:
                raise MemoryError(f"no room in the pool to pin adapter {adapter!r}")
            if not self._free_slots and not self.reclaimable.count(ADAPTER):
                raise MemoryError(f"every adapter slot is in use: cannot pin {adapter!r}")
            resident = self._make_resident(adapter, evict=True)
        resident.pinned = True
        self.reclaimable.discard((ADAPTER, adapter))

    def evict_if_idle(self, adapter: str) -> bool:
        """Drop an idle adapter's pages now, pinned or not (used when it is unregistered);
        False if in use."""
        resident = self._resident.get(adapter)
        if resident is None or resident.num_users:
            return resident is None
        self._evict(resident)
        return True

    def is_resident(self, adapter: str) -> bool:
        return adapter in self._resident

    def is_in_use(self, adapter: str) -> bool:
        resident = self._resident.get(adapter)
        return resident is not None and resident.num_users > 0

    def resident_adapters(self) -> list[str]:
        """Names of resident adapters, in the order they became resident."""
        return list(self._resident)

    def pinned_adapters(self) -> list[str]:
        return [name for name, resident in self._resident.items() if resident.pinned]

    @property
    def num_kv_pages(self) -> int:
        """KV pages running requests hold (a page shared by several counted once)."""
        return self._num_kv_allocated - self.num_cached_pages

    @property
    def num_cached_pages(self) -> int:
        """Cached KV blocks that no running request reads (reclaimable)."""
        return 0 if self.prefix_cache is None else self.prefix_cache.num_idle_pages

    @property
    def num_adapter_pages(self) -> int:
        return sum(len(r.pages) for r in self._resident.values())

    @property
    def num_pages_for_requests(self) -> int:
        """Pages a request and its adapter may ever use: all but the pinned adapters'."""
        pinned = sum(len(r.pages) for r in self._resident.values() if r.pinned)
        return self.num_total_pages - pinned

    @property
    def num_pinned_adapter_pages(self) -> int:
        """Pages of resident adapters that are not reclaimable now (in use, or pinned)."""
        return sum(len(r.pages) for r in self._resident.values() if r.num_users or r.pinned)

    @property
    def num_free_pages(self) -> int:
        return self.allocator.num_free

    def check_invariants(self, block_tables: Iterable[Sequence[int]] | None = None) -> None:
        """Asserts (tests call it every step): KV pages in use + cached + adapter pages + free
        pages == total; the reclaimable set is exactly the idle unpinned adapters and the
        cached blocks nothing reads; with the running requests' `block_tables`, no page is
        in two places and each cached page's count is the number of tables holding it."""
        kv, cached, adapter = self.num_kv_pages, self.num_cached_pages, self.num_adapter_pages
        free, total = self.allocator.num_free, self.num_total_pages
        assert kv >= 0 and kv + cached + adapter + free == total, (
            f"page leak: {kv} kv + {cached} cached + {adapter} adapter + {free} free != {total}"
        )
        idle: set[Any] = {
            (ADAPTER, r.name) for r in self._resident.values() if not (r.num_users or r.pinned)
        }
        if self.prefix_cache is not None:
            idle |= self.prefix_cache.idle_keys()
        assert set(self.reclaimable) == idle, f"reclaimable {set(self.reclaimable)} != idle {idle}"
        assert len(self._free_slots) + len(self._resident) == self.max_resident_adapters
        if block_tables is not None:
            self._check_pages(Counter(page for table in block_tables for page in table))
        elif self.prefix_cache is not None:
            self.prefix_cache.check()

    def _check_pages(self, held: Counter[int]) -> None:
        """Every page is free, an adapter's, cached, or one running request's own, once."""
        cached: set[int] = set()
        if self.prefix_cache is not None:
            self.prefix_cache.check(held)
            cached = self.prefix_cache.pages()
        own = [page for page, count in held.items() if page not in cached]
        assert all(held[page] == 1 for page in own), "an uncached page in two block tables"
        adapter_pages = [page for r in self._resident.values() for page in r.pages]
        free = [page for page in range(self.num_total_pages) if self.allocator.is_free(page)]
        every = sorted([*own, *cached, *adapter_pages, *free])
        assert every == list(range(self.num_total_pages)), "a page in two places, or lost"

    # -- internals -----------------------------------------------------------------------

    def _make_resident(self, name: str, evict: bool) -> ResidentAdapter:
        if not self.adapters.in_host(name):
            raise UnknownAdapterError(f"adapter {name!r} is not in host RAM")
        host = self.adapters.host(name)
        if evict:
            if not self._free_slots:
                least_recent = self.reclaimable.least_recent(ADAPTER)
                if least_recent is None:
                    raise MemoryError("no idle adapter to evict: every slot is in use")
                self._evict_holder(least_recent)
            self._reclaim(host.num_pages)
        pages = self.allocator.allocate(host.num_pages)
        resident = ResidentAdapter(name, self._free_slots.pop(), pages, host.identity)
        self._resident[name] = resident
        self._pending_loads.append(AdapterLoad(name, resident.slot, tuple(pages), host))
        return resident

    def _reclaim(self, num_pages: int) -> None:
        """Evict reclaimable holders, least recently used first, until `num_pages` are free."""
        while self.allocator.num_free < num_pages:
            least_recent = self.reclaimable.least_recent()
            if least_recent is None:
                raise MemoryError("nothing reclaimable left: the pool is full")
            self._evict_holder(least_recent)

    def _evict_holder(self, key: ReclaimableKey) -> None:
        """Reclaim one holder's pages, whichever kind it is."""
        kind, name = key
        if kind == KV_BLOCK:
            assert self.prefix_cache is not None and isinstance(name, bytes)
            self.allocator.free([self.prefix_cache.evict(name)])
            self._num_kv_allocated -= 1
            self.stats.kv_block_evictions += 1
            return
        assert kind == ADAPTER, f"no eviction for reclaimable kind {kind!r}"
        self._evict(self._resident[str(name)])

    def _identity(self, adapter: str | None) -> bytes:
        """What the KV of `adapter`'s requests depends on: the weights resident (those its
        requests run with), else those in host RAM (those it will be made resident from)."""
        if adapter is None:
            return BASE_MODEL_IDENTITY
        resident = self._resident.get(adapter)
        return self.adapters.host(adapter).identity if resident is None else resident.identity

    def _evict(self, resident: ResidentAdapter) -> None:
        del self._resident[resident.name]
        self.reclaimable.discard((ADAPTER, resident.name))
        self.allocator.free(resident.pages)
        self._free_slots.append(resident.slot)
        pending = [load for load in self._pending_loads if load.name != resident.name]
        if len(pending) == len(self._pending_loads):
            self.stats.adapter_evictions += 1  # its weights had been handed to the runner
        self._pending_loads = pending
        self.on_evict(resident.name)
