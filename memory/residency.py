"""The records of the pool's adapter residency: the host tier it reads from, the loads it
plans for the runner, the adapters it holds, and its counters (pure Python, no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class HostTier(Protocol):
    """Adapters in host RAM (memory/adapter_catalog.AdapterCatalog)."""

    def in_host(self, name: str | None) -> bool: ...

    def host(self, name: str) -> Any:
        """The host copy (a `HostAdapter`, with `num_pages` and `identity`)."""
        ...

    def touch(self, name: str) -> None: ...


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
    identity: bytes
    """Its weights' name (`HostAdapter.identity`): the seed of its KV blocks' hashes."""
    num_users: int = 0
    pinned: bool = False
    """Kept resident until unregistered (--pin-adapter): never reclaimable."""


@dataclass
class PoolStats:
    """Counters for metrics."""

    adapter_loads: int = 0
    adapter_evictions: int = 0
    prefix_cache_queries: int = 0
    """Tokens of admitted requests looked up in the prefix cache (vLLM's counting)."""
    prefix_cache_hits: int = 0
    """Of those, tokens found cached (their KV was not computed again)."""
    kv_block_evictions: int = 0
