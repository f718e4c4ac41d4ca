"""Prefix caching: full KV blocks found again by a chained hash, shared by reference count.

A full block (`block_size` tokens whose KV is computed) is named by a hash that covers
the adapter that computed it and every token up to its end:

    hash[0] = H(identity   || tokens of block 0)      identity: the adapter's (or the base model's)
    hash[i] = H(hash[i-1]  || tokens of block i)      H = SHA-256 (collision-resistant: tenants
                                                       must not be able to forge another's block)

The identity names the adapter's weights as read (`HostAdapter.identity`,
memory/adapter_store.py): its file's version (device, inode, size, modification and change
times) with its config's fields, or the SHA-256 of its pages for a file changed too
recently to trust its times. So another folder loaded under the same name after an unload
(or the folder edited on disk and read again) gets new names for its blocks, while the
same folder under two names shares them. The base model has its own fixed identity.

A new request takes the longest chain of cached blocks that starts its tokens (never all
of them: at least one token is computed, so there is a logit to sample) and computes
from there. Cached pages are shared: each counts the running requests that read it.
When a request lets go of its pages (finished, aborted, preempted), a cached page whose
count drops to 0 stays cached and joins the pool's reclaimable set as
`("kv_block", hash)`, in the one least-recently-used order it shares with idle adapters;
a request's other pages (its partial last block, a block another request cached first)
go back to the free list. Blocks are released last to first, so a cold sequence's tail
is reclaimed before its head (which other prompts are likelier to share).

Per-request state lives on the request (`CachedSequence`: its block hashes, computed
once each, and the identity they were computed under), so a step hashes only the
blocks that became full in it. Pure Python.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from typing import Protocol

from loraserve.memory.reclaimable import ReclaimableSet

KV_BLOCK = "kv_block"
"""The reclaimable kind of a cached KV block nothing running reads: key ("kv_block", hash)."""

BASE_MODEL_IDENTITY = hashlib.sha256(b"loraserve: the base model, no adapter").digest()
"""The chain's seed for requests without an adapter."""


class CachedSequence(Protocol):
    """What prefix caching reads and keeps on a request (the scheduler's `SequenceState`)."""

    adapter: str | None
    cache_scope: str
    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int]
    reuse_cached_prefix: bool
    block_hashes: list[bytes]
    block_hash_seed: bytes


def scoped(identity: bytes, scope: str) -> bytes:
    """The chain's seed for requests that share cached blocks only with requests of the same
    `scope` (their tenant's group, their `cache_salt`); "" shares with every request."""
    if not scope:
        return identity
    return hashlib.sha256(
        identity + b"\x00scope\x00" + scope.encode("utf-8", "surrogatepass")
    ).digest()


def chain_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The name of a full block: its parent's name (or the identity) and its tokens."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class PrefixCache:
    """Cached full blocks: hash <-> page, and how many running requests read each page."""

    def __init__(self, block_size: int, reclaimable: ReclaimableSet) -> None:
        self.block_size = block_size
        self.reclaimable = reclaimable
        """The pool's idle holders: cached pages join it when nothing reads them."""
        self._page_of: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._refs: dict[int, int] = {}
        """Cached page -> running requests that read it (0: idle, reclaimable)."""
        self.num_idle_pages = 0
        """Cached pages no running request reads."""

    # -- lookups -------------------------------------------------------------------------

    def block_hashes(self, seq: CachedSequence, identity: bytes, num_blocks: int) -> list[bytes]:
        """The hashes of `seq`'s first `num_blocks` full blocks, computing only the new ones
        (all again if `identity` is not the one they were computed under)."""
        if seq.block_hash_seed != identity:
            seq.block_hashes, seq.block_hash_seed = [], identity
        hashes, size, tokens = seq.block_hashes, self.block_size, seq.token_ids
        parent = hashes[-1] if hashes else identity
        for index in range(len(hashes), num_blocks):
            parent = chain_hash(parent, tokens[index * size : (index + 1) * size])
            hashes.append(parent)
        return hashes

    def lookup(self, seq: CachedSequence, identity: bytes) -> list[int]:
        """Pages of the longest cached chain that starts `seq` (at most all but its last
        token); hashes only as far as the first block not cached."""
        max_blocks = (len(seq.token_ids) - 1) // self.block_size
        pages: list[int] = []
        for index in range(max_blocks):
            page = self._page_of.get(self.block_hashes(seq, identity, index + 1)[index])
            if page is None:
                break
            pages.append(page)
        return pages

    def num_idle(self, pages: Sequence[int]) -> int:
        """How many of these cached pages are reclaimable now."""
        return sum(1 for page in pages if not self._refs[page])

    # -- requests take and let go of pages ----------------------------------------------

    def acquire(self, pages: Sequence[int]) -> None:
        """One more running request reads these cached pages (none is reclaimable then)."""
        for page in pages:
            refs = self._refs[page]
            if not refs:
                self.reclaimable.discard((KV_BLOCK, self._hash_of[page]))
                self.num_idle_pages -= 1
            self._refs[page] = refs + 1

    def register(self, seq: CachedSequence, first: int, end: int) -> None:
        """Blocks `first .. end - 1` of `seq` are full and computed: cache each under its hash,
        read by `seq`. A block whose hash is cached already (another request computed the
        same tokens in the same step) stays `seq`'s own page."""
        hashes = self.block_hashes(seq, seq.block_hash_seed, end)
        for index in range(first, end):
            block_hash, page = hashes[index], seq.block_table[index]
            if block_hash in self._page_of or page in self._refs:
                continue
            self._page_of[block_hash] = page
            self._hash_of[page] = block_hash
            self._refs[page] = 1

    def release(self, pages: Sequence[int]) -> list[int]:
        """A request lets go of its pages: cached ones it was the last to read become idle,
        last block first; returns the pages that were not cached (for the free list)."""
        uncached = []
        for page in reversed(pages):
            refs = self._refs.get(page)
            if refs is None:
                uncached.append(page)
                continue
            assert refs > 0, f"cached page {page} released more often than acquired"
            self._refs[page] = refs - 1
            if refs == 1:
                self.reclaimable.add((KV_BLOCK, self._hash_of[page]), 1)
                self.num_idle_pages += 1
        return uncached

    def evict(self, block_hash: bytes) -> int:
        """Forget an idle cached block (the pool reclaims it); returns its page."""
        page = self._page_of.pop(block_hash)
        del self._hash_of[page]
        assert self._refs.pop(page) == 0, f"evicted cached page {page} while it is read"
        self.reclaimable.discard((KV_BLOCK, block_hash))
        self.num_idle_pages -= 1
        return page

    # -- checks --------------------------------------------------------------------------

    def pages(self) -> set[int]:
        return set(self._refs)

    def idle_keys(self) -> set[tuple[str, bytes]]:
        """The reclaimable keys this cache must have in the pool's set."""
        return {(KV_BLOCK, self._hash_of[page]) for page, refs in self._refs.items() if not refs}

    def check(self, held: dict[int, int] | None = None) -> None:
        """Asserts: hash <-> page both ways, counts never negative, the idle count right;
        with `held` (page -> how many running block tables hold it), each cached page is
        read by exactly the requests that hold it."""
        assert len(self._page_of) == len(self._hash_of) == len(self._refs)
        for block_hash, page in self._page_of.items():
            assert self._hash_of[page] == block_hash and self._refs[page] >= 0
            if held is not None:
                assert self._refs[page] == held.get(page, 0), (
                    f"cached page {page}: {self._refs[page]} refs, held by {held.get(page, 0)}"
                )
        assert self.num_idle_pages == sum(1 for refs in self._refs.values() if not refs)
