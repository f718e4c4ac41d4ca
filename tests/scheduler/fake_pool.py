"""A pure-Python `PoolAccounting`: a free list, adapters of a few pages each, LRU eviction.

It follows the contract of memory/pool.py without tensors: an adapter is held while
any running request uses it, stays resident when idle, and idle adapters are evicted
least recently used first when pages are needed. Adapters in `not_ready` are "being
read from disk": `adapter_ready` says False until a test makes them ready.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from loraserve.scheduler import SequenceState


class FakePool:
    def __init__(self, num_pages: int, block_size: int, adapter_pages: dict[str, int]) -> None:
        self.block_size = block_size
        self.num_total_pages = num_pages
        self.adapter_pages = adapter_pages  # name -> pages its weights take
        self.free_pages = list(range(num_pages - 1, -1, -1))  # pop() hands out 0, 1, 2...
        self.kv_pages: set[int] = set()
        self.resident: OrderedDict[str, list[int]] = OrderedDict()  # least recent first
        self.users: dict[str, int] = {}
        self.evictions: list[str] = []
        self.slots: dict[str, int] = {}  # resident adapter -> its slot
        self.loads: list[str] = []  # made resident since the last take_loads()
        self.not_ready: set[str] = set()  # adapters still being read from disk
        self.prefetched: list[str] = []

    # -- PoolAccounting ------------------------------------------------------------------

    def can_allocate(
        self, num_pages: int, adapter: str | None = None, cached: Sequence[int] = ()
    ) -> bool:
        assert not cached, "this pool caches no prefix"
        needed = num_pages
        if adapter is not None and adapter not in self.resident:
            needed += self.adapter_pages[adapter]
        # `adapter` itself is not reclaimable, even if idle now: acquiring it pins it.
        reclaimable = self.num_reclaimable_pages(excluding=adapter)
        return needed <= len(self.free_pages) + reclaimable

    def adapter_ready(self, adapter: str | None) -> bool:
        return adapter not in self.not_ready

    def prefetch_adapter(self, adapter: str | None) -> bool:
        if adapter is None or adapter in self.resident or adapter in self.not_ready:
            return False
        if self.adapter_pages[adapter] > len(self.free_pages):
            return False
        self._make_resident(adapter)
        self.prefetched.append(adapter)
        return True

    def cached_prefix(self, seq: SequenceState) -> list[int]:
        return []  # no prefix caching here (tests/memory/test_prefix_cache_properties.py has it)

    def acquire_cached(self, seq: SequenceState, pages: list[int]) -> list[int]:
        return []

    def cache_full_blocks(self, seq: SequenceState, start: int) -> None:
        pass

    def allocate(self, num_pages: int) -> list[int]:
        pages = self._take(num_pages)
        self.kv_pages.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        assert len(set(pages)) == len(pages), f"pages freed twice in one call: {pages}"
        for page in pages:
            assert page in self.kv_pages, f"page {page} freed but not allocated"
            self.kv_pages.remove(page)
            self.free_pages.append(page)

    def acquire_adapter(self, adapter: str | None) -> None:
        if adapter is None:
            return
        assert adapter not in self.not_ready, f"acquired {adapter} before it was ready"
        if adapter not in self.resident:
            self._make_resident(adapter)
        self.users[adapter] += 1
        self.resident.move_to_end(adapter)

    def release_adapter(self, adapter: str | None) -> None:
        if adapter is None:
            return
        assert self.users.get(adapter, 0) > 0, f"adapter {adapter} released more than acquired"
        self.users[adapter] -= 1

    def slot_of(self, adapter: str | None) -> int:
        return -1 if adapter is None else self.slots[adapter]

    def take_loads(self) -> list[str]:
        loads, self.loads = self.loads, []
        return loads

    # -- for tests -----------------------------------------------------------------------

    def num_reclaimable_pages(self, excluding: str | None = None) -> int:
        """Pages of idle resident adapters (but `excluding`)."""
        return sum(
            len(pages)
            for name, pages in self.resident.items()
            if not self.users[name] and name != excluding
        )

    def num_adapter_pages(self) -> int:
        return sum(len(pages) for pages in self.resident.values())

    def check_invariants(self) -> None:
        """Pages in use + pages free == pages total, and no page is in two places."""
        adapter_pages = [page for pages in self.resident.values() for page in pages]
        every_page = [*self.free_pages, *self.kv_pages, *adapter_pages]
        assert len(self.kv_pages) + len(adapter_pages) + len(self.free_pages) == (
            self.num_total_pages
        ), "page leak"
        assert sorted(every_page) == list(range(self.num_total_pages)), "page in two places"

    def _make_resident(self, adapter: str) -> None:
        self.resident[adapter] = self._take(self.adapter_pages[adapter])
        self.users[adapter] = 0
        self.slots[adapter] = min(set(range(len(self.slots) + 1)) - set(self.slots.values()))
        self.loads.append(adapter)

    def _take(self, num_pages: int) -> list[int]:
        while len(self.free_pages) < num_pages:
            idle = next((name for name in self.resident if not self.users[name]), None)
            if idle is None:
                raise MemoryError(f"{num_pages} pages wanted, {len(self.free_pages)} free")
            self.free_pages.extend(self.resident.pop(idle))
            del self.users[idle], self.slots[idle]
            if idle in self.loads:
                self.loads.remove(idle)
            self.evictions.append(idle)
        return [self.free_pages.pop() for _ in range(num_pages)]
