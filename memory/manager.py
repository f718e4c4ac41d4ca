"""The unified page pool: KV blocks and resident adapters share one allocation.

`MemoryManager` owns the pool tensor, its free list and adapter residency. It is
the scheduler's `PoolAccounting` (page counts and ids), and `prepare()` does the
data movement the scheduler's decisions imply (copying newly resident adapters
in from host RAM, writing their rows of the offset tables the LoRA kernels read).

Residency: an adapter is pinned while any running request uses it; idle resident
adapters stay (a later request finds them loaded) until pages or slots are needed,
then the least recently used goes first.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from loraserve.errors import UnknownAdapterError
from loraserve.kernels.constants import NO_ADAPTER
from loraserve.memory.adapter_store import AdapterStore, HostAdapter
from loraserve.memory.allocator import PageAllocator
from loraserve.memory.geometry import PoolGeometry
from loraserve.models.arch import NUM_LORA_MODULES


@dataclass
class ResidentAdapter:
    """An adapter whose weights occupy pool pages."""

    name: str
    slot: int
    pages: list[int]
    host: HostAdapter
    num_users: int = 0
    loaded: bool = False
    """False until `prepare()` has copied the weights in."""


@dataclass
class MemoryStats:
    """Counters for metrics; updated as adapters come and go."""

    adapter_loads: int = 0
    adapter_evictions: int = 0
    adapter_load_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))
    """Latencies of loads not yet taken by `drain_load_seconds` (bounded: with no
    metrics reader, as under `LLM`, the oldest are dropped)."""

    def drain_load_seconds(self) -> list[float]:
        """The load latencies recorded since the last call; they are forgotten here."""
        taken = list(self.adapter_load_seconds)
        self.adapter_load_seconds.clear()
        return taken


class MemoryManager:
    """The pool, its free list, and which adapters are resident where."""

    def __init__(
        self,
        geometry: PoolGeometry,
        num_pages: int,
        store: AdapterStore,
        dtype: torch.dtype,
        device: torch.device,
        max_resident_adapters: int,
    ) -> None:
        self.geometry = geometry
        self.store = store
        self.device = device
        self.allocator = PageAllocator(num_pages)
        # [num_pages, page_numel]: the one device allocation (untouched pages cost nothing on CPU)
        self.pool = torch.empty(num_pages, geometry.page_numel, dtype=dtype, device=device)
        # [num_pages, layers, 2, block_size, kv_heads, head_dim]: the KV view of every page
        self.kv_pages = self.pool[:, : geometry.kv_block_numel].view(
            num_pages, *geometry.kv_shape()
        )
        num_layers = geometry.num_layers
        # [slots, layers, modules, 2]: element offsets of A and B; -1 = not targeted
        self.lora_offsets = torch.full(
            (max_resident_adapters, num_layers, NUM_LORA_MODULES, 2),
            -1,
            dtype=torch.int64,
            device=device,
        )
        # [slots, layers, modules]: rank of each matrix pair; 0 = not targeted
        self.lora_ranks = torch.zeros(
            (max_resident_adapters, num_layers, NUM_LORA_MODULES), dtype=torch.int32, device=device
        )
        self._free_slots = list(range(max_resident_adapters - 1, -1, -1))
        self._resident: OrderedDict[str, ResidentAdapter] = OrderedDict()  # LRU first
        self.num_kv_pages = 0
        self.stats = MemoryStats()

    # -- the scheduler's view (PoolAccounting) -------------------------------------------

    @property
    def block_size(self) -> int:
        return self.geometry.block_size

    @property
    def num_total_pages(self) -> int:
        return self.allocator.num_pages

    def can_allocate(self, num_pages: int, adapter: str | None = None) -> bool:
        # The request's own adapter is not reclaimable: acquiring it pins its pages.
        reclaimable = [r for r in self._resident.values() if r.num_users == 0 and r.name != adapter]
        available = self.allocator.num_free + sum(len(r.pages) for r in reclaimable)
        if adapter is None or adapter in self._resident:
            return num_pages <= available
        if not self._free_slots and not reclaimable:
            return False
        return num_pages + self.store.get(adapter).num_pages <= available

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

    # -- data movement and lookups for the engine ----------------------------------------

    def prepare(self) -> None:
        """Copy in the weights of adapters made resident since the last call."""
        for resident in self._resident.values():
            if not resident.loaded:
                self._load(resident)

    def slot_of(self, adapter: str | None) -> int:
        """The offset-table row of a resident adapter; NO_ADAPTER for the base model."""
        return NO_ADAPTER if adapter is None else self._resident[adapter].slot

    def max_rank_of(self, adapter: str | None) -> int:
        return 0 if adapter is None else self.store.get(adapter).max_rank

    def evict_if_idle(self, adapter: str) -> bool:
        """Drop an idle adapter's pages now (used when it is unregistered)."""
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
        if name not in self.store:
            raise UnknownAdapterError(f"adapter {name!r} is not registered")
        host = self.store.get(name)
        if not self._free_slots:
            self._evict(self._least_recent_idle())
        self._reclaim(host.num_pages)
        pages = self.allocator.allocate(host.num_pages)
        resident = ResidentAdapter(name, self._free_slots.pop(), pages, host)
        self._resident[name] = resident
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
        self.lora_offsets[resident.slot] = -1
        self.lora_ranks[resident.slot] = 0
        self._free_slots.append(resident.slot)
        self.stats.adapter_evictions += int(resident.loaded)

    def _load(self, resident: ResidentAdapter) -> None:
        """One copy per page from host RAM, then the adapter's offset-table rows."""
        started = time.perf_counter()
        host, page_numel = resident.host, self.geometry.page_numel
        pages = torch.tensor(resident.pages, dtype=torch.int64, device=self.device)
        self.pool[pages] = host.pages.to(self.device, non_blocking=True)
        local = host.local_offsets.to(self.device)  # [layers, modules, 2]
        global_offsets = pages[local.clamp(min=0) // page_numel] * page_numel + local % page_numel
        self.lora_offsets[resident.slot] = torch.where(local >= 0, global_offsets, -1)
        self.lora_ranks[resident.slot] = host.ranks.to(self.device)
        resident.loaded = True
        self.stats.adapter_loads += 1
        self.stats.adapter_load_seconds.append(time.perf_counter() - started)
