"""The free list of the unified pool: page ids only, no tensors (pure Python)."""

from __future__ import annotations


class PageAllocator:
    """Hands out page ids `0 .. num_pages - 1`; KV blocks and adapter slabs alike."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"the pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        # Popping from the end hands out low page ids first: easier to read in tests.
        self._free = list(range(num_pages - 1, -1, -1))
        self._is_free = [True] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    def is_free(self, page: int) -> bool:
        return self._is_free[page]

    def allocate(self, count: int) -> list[int]:
        """Take `count` pages; raises MemoryError (taking none) if fewer are free."""
        if count > len(self._free):
            raise MemoryError(f"asked for {count} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(count)]
        for page in pages:
            self._is_free[page] = False
        return pages

    def free(self, pages: list[int]) -> None:
        """Give pages back; freeing a page twice is a bug and asserts."""
        for page in pages:
            assert not self._is_free[page], f"page {page} freed twice"
            self._is_free[page] = True
            self._free.append(page)
