"""The unified page pool's bookkeeping: which pages hold KV, which hold adapters, which are free.

Pure Python (no torch): the pool tensor itself, its KV view and the LoRA offset
tables belong to the model runner (engine/device_pool.py), which copies what this
bookkeeping decides. `UnifiedPool` is the scheduler's `PoolAccounting`.

Residency: an adapter is pinned while any running request uses it; idle resident
adapters stay (a later request finds them loaded) until pages or slots are needed,
then the least recently used goes first. Making an adapter resident reserves its
pages and a slot (a row of the runner's offset tables) at once, and queues an
`AdapterLoad`; the scheduler hands the step's loads to the runner in its plan, so
weights are copied before the forward pass that first reads them.

Invariant (tested after every step): KV pages + adapter pages + free pages == total.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

from loraserve.errors import UnknownAdapterError
from loraserve.kernels.constants import NO_ADAPTER
from loraserve.memory.allocator import PageAllocator


class SizedAdapter(Protocol):
    """What the bookkeeping needs of a registered adapter (memory/adapter_store.HostAdapter)."""

    @property
    def num_pages(self) -> int: ...


class AdapterCatalog(Protocol):
    """Registered adapters by name (memory/adapter_store.AdapterStore)."""

    def __contains__(self, name: object) -> bool: ...

    def get(self, name: str) -> Any: ...


@dataclass(frozen=True)
class AdapterLoad:
    """Copy `adapter`'s host pages into pool `pages` and point offset-table row `slot` at them."""

    name: str
    slot: int
    pages: tuple[int, ...]
    adapter: Any
    """The host copy (a `HostAdapter`): page-sized slabs, local offsets, ranks."""


@dataclass
class ResidentAdapter:
    """An adapter whose weights occupy pool pages."""

    name: str
    slot: int
    pages: list[int]
    num_users: int = 0


@dataclass
class PoolStats:
    """Counters for metrics."""

    adapter_loads: int = 0
    adapter_evictions: int = 0


class UnifiedPool:
    """Pages of the pool (KV blocks and adapter slabs alike) and adapter residency."""

    def __init__(
        self, num_pages: int, block_size: int, max_resident_adapters: int, adapters: AdapterCatalog
    ) -> None:
        self.allocator = PageAllocator(num_pages)
        self._block_size = block_size
        self.adapters = adapters
        self.max_resident_adapters = max_resident_adapters
        self._free_slots = list(range(max_resident_adapters - 1, -1, -1))
        self._resident: OrderedDict[str, ResidentAdapter] = OrderedDict()  # LRU first
        self._pending_loads: list[AdapterLoad] = []
        self.num_kv_pages = 0
        self.stats = PoolStats()

    # -- the scheduler's view (PoolAccounting) -------------------------------------------

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_total_pages(self) -> int:
        return self.allocator.num_pages

    def can_allocate(self, num_pages: int, adapter: str | None = None) -> bool:
        resident = adapter is None or adapter in self._resident
        if resident and num_pages <= self.allocator.num_free:
            return True  # the common case (a decode step), without looking at the adapters
        # The request's own adapter is not reclaimable: acquiring it pins its pages.
        reclaimable = [r for r in self._resident.values() if r.num_users == 0 and r.name != adapter]
        available = self.allocator.num_free + sum(len(r.pages) for r in reclaimable)
        if resident:
            return num_pages <= available
        if not self._free_slots and not reclaimable:
            return False
        assert adapter is not None
        return num_pages + self.adapters.get(adapter).num_pages <= available

    def allocate(self, num_pages: int) -> list[int]:
        self._reclaim(num_pages)
        pages = self.allocator.allocate(num_pages)
        self.num_kv_pages += num_pages
        return pages

    def free(self, pages: list[int]) -> None:
        self.allocator.free(pages)
        self.num_kv_pages -= len(pages)

    def acquire_adapter(self, adapter: str | None) -> None:
        if adapter is None:
            return
        resident = self._resident.get(adapter)
        if resident is None:
            resident = self._make_resident(adapter)
        resident.num_users += 1
        self._resident.move_to_end(adapter)

    def release_adapter(self, adapter: str | None) -> None:
        if adapter is None:
            return
        resident = self._resident[adapter]
        assert resident.num_users > 0, f"adapter {adapter} released more than acquired"
        resident.num_users -= 1

    def slot_of(self, adapter: str | None) -> int:
        """The offset-table row of a resident adapter; NO_ADAPTER for the base model."""
        return NO_ADAPTER if adapter is None else self._resident[adapter].slot

    def take_loads(self) -> list[AdapterLoad]:
        """The copies decided since the last call, for the runner to make before its next
        forward pass; each is handed out once."""
        loads, self._pending_loads = self._pending_loads, []
        self.stats.adapter_loads += len(loads)
        return loads

    # -- lookups for the engine and metrics ----------------------------------------------

    def evict_if_idle(self, adapter: str) -> bool:
        """Drop an idle adapter's pages now (used when it is unregistered); False if in use."""
        resident = self._resident.get(adapter)
        if resident is None or resident.num_users:
            return resident is None
        self._evict(resident)
        return True

    def is_in_use(self, adapter: str) -> bool:
        resident = self._resident.get(adapter)
        return resident is not None and resident.num_users > 0

    def resident_adapters(self) -> list[str]:
        """Names of resident adapters, least recently used first."""
        return list(self._resident)

    @property
    def num_adapter_pages(self) -> int:
        return sum(len(r.pages) for r in self._resident.values())

    @property
    def num_pinned_adapter_pages(self) -> int:
        """Pages of resident adapters that running requests use (not reclaimable now)."""
        return sum(len(r.pages) for r in self._resident.values() if r.num_users)

    @property
    def num_free_pages(self) -> int:
        return self.allocator.num_free

    def check_invariants(self) -> None:
        """Pages in use + pages free == pages total (asserts; tests call it every step)."""
        used = self.num_kv_pages + self.num_adapter_pages
        assert used + self.allocator.num_free == self.num_total_pages, (
            f"page leak: {self.num_kv_pages} kv + {self.num_adapter_pages} adapter + "
            f"{self.allocator.num_free} free != {self.num_total_pages}"
        )

    # -- internals -----------------------------------------------------------------------

    def _make_resident(self, name: str) -> ResidentAdapter:
        if name not in self.adapters:
            raise UnknownAdapterError(f"adapter {name!r} is not registered")
        host = self.adapters.get(name)
        if not self._free_slots:
            self._evict(self._least_recent_idle())
        self._reclaim(host.num_pages)
        pages = self.allocator.allocate(host.num_pages)
        resident = ResidentAdapter(name, self._free_slots.pop(), pages)
        self._resident[name] = resident
        self._pending_loads.append(AdapterLoad(name, resident.slot, tuple(pages), host))
        return resident

    def _reclaim(self, num_pages: int) -> None:
        """Evict idle adapters, least recently used first, until `num_pages` are free."""
        while self.allocator.num_free < num_pages:
            self._evict(self._least_recent_idle())

    def _least_recent_idle(self) -> ResidentAdapter:
        for resident in self._resident.values():
            if resident.num_users == 0:
                return resident
        raise MemoryError("no idle adapter to evict: the pool is full")

    def _evict(self, resident: ResidentAdapter) -> None:
        del self._resident[resident.name]
        self.allocator.free(resident.pages)
        self._free_slots.append(resident.slot)
        pending = [load for load in self._pending_loads if load.name != resident.name]
        if len(pending) == len(self._pending_loads):
            self.stats.adapter_evictions += 1  # its weights had been handed to the runner
        self._pending_loads = pending
