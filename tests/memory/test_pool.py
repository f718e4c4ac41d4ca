"""The unified pool's residency rules, against a fake host tier: one LRU order over idle
holders, pins that are never reclaimed, prefetch into free pages only, loads dropped when
their adapter is reclaimed before the runner got them."""

from __future__ import annotations

import pytest
from fake_tier import FakeTier

from loraserve.memory.pool import ADAPTER, UnifiedPool


def make(num_pages: int = 10, slots: int = 3, **pages: int) -> tuple[UnifiedPool, list[str]]:
    evicted: list[str] = []
    pool = UnifiedPool(num_pages, 4, slots, FakeTier(pages), on_evict=evicted.append)
    return pool, evicted


def use(pool: UnifiedPool, name: str) -> None:
    """A request runs with `name`, then ends: the adapter stays, idle."""
    pool.acquire_adapter(name)
    pool.release_adapter(name)


def test_idle_adapters_are_reclaimed_least_recently_used_first() -> None:
    pool, evicted = make(num_pages=10, a=3, b=3, c=3)
    for name in ("a", "b", "c"):
        use(pool, name)
    use(pool, "a")  # a is now the most recent
    assert list(pool.reclaimable) == [(ADAPTER, "b"), (ADAPTER, "c"), (ADAPTER, "a")]
    assert pool.can_allocate(7) and not pool.can_allocate(11)
    pool.allocate(5)  # 1 free: b, then c, go
    assert evicted == ["b", "c"] and pool.resident_adapters() == ["a"]
    pool.check_invariants()


def test_a_requests_own_idle_adapter_does_not_count_as_reclaimable() -> None:
    pool, _ = make(num_pages=6, a=3)
    use(pool, "a")
    assert pool.can_allocate(6) and not pool.can_allocate(4, "a")


def test_pinned_adapters_are_never_reclaimed() -> None:
    pool, evicted = make(num_pages=8, p=3, q=3)
    pool.pin_adapter("p")
    use(pool, "p")
    use(pool, "q")
    assert list(pool.reclaimable) == [(ADAPTER, "q")]
    assert pool.num_pinned_adapter_pages == 3
    pool.allocate(5)
    assert evicted == ["q"] and pool.pinned_adapters() == ["p"]
    with pytest.raises(MemoryError):
        pool.allocate(1)
    pool.check_invariants()


def test_pinning_fails_without_room_and_unregistering_drops_a_pin() -> None:
    pool, _ = make(num_pages=4, p=3, q=2)
    pool.allocate(2)
    with pytest.raises(MemoryError, match="no room"):
        pool.pin_adapter("p")
    pool.pin_adapter("q")
    assert pool.evict_if_idle("q") and not pool.is_resident("q")
    pool.check_invariants()


def test_prefetch_uses_free_pages_only_and_leaves_the_adapter_reclaimable() -> None:
    pool, evicted = make(num_pages=6, slots=2, a=2, b=2, c=5)
    pool.allocate(1)
    assert pool.prefetch_adapter("a") and not pool.prefetch_adapter("a")
    assert not pool.prefetch_adapter("c")  # 3 free pages are too few, and nothing is evicted
    assert pool.prefetch_adapter("b")
    assert not pool.prefetch_adapter("missing")  # not in host RAM: nothing to copy
    assert [load.name for load in pool.take_loads()] == ["a", "b"]
    assert pool.reclaimable.num_pages == 4 and evicted == []
    pool.check_invariants()


def test_a_load_reclaimed_before_the_runner_got_it_is_dropped() -> None:
    pool, evicted = make(num_pages=4, slots=1, a=2, b=2)
    pool.prefetch_adapter("a")
    pool.acquire_adapter("b")  # the only slot: a goes, its copy was never handed out
    assert evicted == ["a"]
    assert [load.name for load in pool.take_loads()] == ["b"]
    assert pool.stats.adapter_evictions == 0  # nothing had been copied for a
    pool.check_invariants()


def test_adapter_ready_means_resident_or_in_host_ram() -> None:
    pool, _ = make(a=1)
    assert pool.adapter_ready(None) and pool.adapter_ready("a")
    assert not pool.adapter_ready("on-disk-only")


def test_a_pin_may_not_take_the_last_slot() -> None:
    pool, _ = make(num_pages=10, slots=2, p=1, q=1)
    pool.pin_adapter("p")
    pool.pin_adapter("p")  # already pinned: nothing changes
    with pytest.raises(MemoryError, match="none of the 2 adapter slots"):
        pool.pin_adapter("q")
    assert pool.num_pages_for_requests == 9 and pool.pinned_adapters() == ["p"]
