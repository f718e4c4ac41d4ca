"""Idle holders of pool pages, in one least-recently-used order.

A page holder is reclaimable when nothing running needs it: an idle resident adapter
(no running request uses it, not pinned), or a cached KV block that no running request
reads (memory/prefix_cache.py). When the pool needs pages, it reclaims the
least recently used holder first, whatever its kind, so an idle adapter and a cold
cached block compete on recency alone (docs/architecture.md: both are reclaimable under
one eviction order).

Keys are `(kind, id)` tuples, e.g. `("adapter", "sql")`; the pool knows how to evict
each kind. The set keeps a running page count, so "how many pages could be had" is
O(1) on the scheduler's hot path.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator

ReclaimableKey = tuple[str, Hashable]
"""(kind, id): ("adapter", name) or ("kv_block", block hash)."""


class ReclaimableSet:
    """Idle page holders, least recently used first, with their page counts."""

    def __init__(self) -> None:
        self._holders: OrderedDict[ReclaimableKey, int] = OrderedDict()
        self._of_kind: dict[str, OrderedDict[ReclaimableKey, None]] = {}
        """The same holders, one order per kind: the least recent adapter is found at once
        however many cached blocks are idle."""
        self._num_pages = 0

    def add(self, key: ReclaimableKey, num_pages: int) -> None:
        """`key` has become idle (most recently used now); it holds `num_pages` pages."""
        self.discard(key)
        self._holders[key] = num_pages
        self._of_kind.setdefault(key[0], OrderedDict())[key] = None
        self._num_pages += num_pages

    def discard(self, key: ReclaimableKey) -> bool:
        """`key` is in use again, or gone; False if it was not here."""
        num_pages = self._holders.pop(key, None)
        if num_pages is None:
            return False
        self._num_pages -= num_pages
        del self._of_kind[key[0]][key]
        return True

    def least_recent(self, kind: str | None = None) -> ReclaimableKey | None:
        """The holder to reclaim first (of `kind` only, if given); None if there is none."""
        if kind is None:
            return next(iter(self._holders), None)
        return next(iter(self._of_kind.get(kind, ())), None)

    def count(self, kind: str) -> int:
        """Holders of `kind` here (O(1): the scheduler asks it on admission)."""
        return len(self._of_kind.get(kind, ()))

    def pages_of(self, key: ReclaimableKey) -> int:
        """Pages `key` holds if it is reclaimable, else 0."""
        return self._holders.get(key, 0)

    @property
    def num_pages(self) -> int:
        """Pages held by reclaimable holders."""
        return self._num_pages

    def __contains__(self, key: object) -> bool:
        return key in self._holders

    def __len__(self) -> int:
        return len(self._holders)

    def __iter__(self) -> Iterator[ReclaimableKey]:
        return iter(self._holders)
