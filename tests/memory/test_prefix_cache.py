"""Prefix caching in the pool: the hash chain, shared pages, and the one eviction order
that cached blocks share with idle adapters."""

from __future__ import annotations

from fake_tier import FakeTier

from loraserve.memory.pool import ADAPTER, UnifiedPool
from loraserve.memory.prefix_cache import BASE_MODEL_IDENTITY, KV_BLOCK, chain_hash
from loraserve.scheduler import SequenceState

BLOCK = 4


def make(num_pages: int = 12, **pages: int) -> tuple[UnifiedPool, FakeTier]:
    tier = FakeTier(pages)
    return UnifiedPool(num_pages, BLOCK, 3, tier), tier


def run(pool: UnifiedPool, seq: SequenceState, *running: SequenceState) -> list[int]:
    """Admit `seq` as the scheduler does (beside `running`), compute all its tokens but the
    cached ones in one chunk, and return the pages it reused."""
    cached = pool.cached_prefix(seq)
    num_cached = len(cached) * BLOCK
    num_pages = -(-seq.num_tokens // BLOCK) - len(cached)
    assert pool.can_allocate(num_pages, seq.adapter, cached)
    seq.block_table = pool.acquire_cached(seq, cached)
    pool.acquire_adapter(seq.adapter)
    seq.block_table += pool.allocate(num_pages)
    seq.num_computed_tokens = seq.num_tokens
    pool.cache_full_blocks(seq, num_cached)
    pool.check_invariants([seq.block_table] + [other.block_table for other in running])
    return cached


def finish(pool: UnifiedPool, seq: SequenceState) -> None:
    pool.free(seq.block_table)
    seq.block_table = []
    pool.release_adapter(seq.adapter)
    pool.check_invariants([])


def test_the_chain_covers_the_identity_every_earlier_token_and_the_blocks_tokens() -> None:
    first = chain_hash(BASE_MODEL_IDENTITY, [1, 2, 3, 4])
    assert first == chain_hash(BASE_MODEL_IDENTITY, [1, 2, 3, 4])
    assert first != chain_hash(b"adapter digest", [1, 2, 3, 4])
    assert first != chain_hash(BASE_MODEL_IDENTITY, [1, 2, 3, 5])
    # Same tokens in block 1 after a different block 0: another name.
    assert chain_hash(first, [5, 6, 7, 8]) != chain_hash(
        chain_hash(BASE_MODEL_IDENTITY, [9] * 4), [5, 6, 7, 8]
    )
    # Token ids are not confused by their byte encoding (256 vs 1, 0).
    assert chain_hash(first, [256, 0, 0, 0]) != chain_hash(first, [0, 1, 0, 0])


def test_a_shared_prefix_is_reused_and_at_least_one_token_is_computed() -> None:
    pool, _ = make()
    a = SequenceState("a", None, list(range(10)))  # 2 full blocks and 2 tokens
    assert run(pool, a) == []
    full_blocks = a.block_table[:2]
    finish(pool, a)
    assert pool.num_cached_pages == 2 and pool.num_kv_pages == 0
    b = SequenceState("b", None, [*range(8), 99, 98, 97])
    assert run(pool, b) == full_blocks
    finish(pool, b)
    exact = SequenceState("c", None, list(range(8)))  # all of it cached: the last block is not
    assert len(run(pool, exact)) == 1
    assert pool.stats.prefix_cache_queries == 10 + 11 + 8
    assert pool.stats.prefix_cache_hits == 0 + 8 + 4


def test_shared_pages_are_counted_once_and_freed_by_the_last_reader() -> None:
    pool, _ = make()
    a = SequenceState("a", None, list(range(9)))
    run(pool, a)
    b = SequenceState("b", None, list(range(9)))
    assert run(pool, b, a) == a.block_table[:2]
    pool.check_invariants([a.block_table, b.block_table])
    assert pool.num_kv_pages == 4  # 2 shared + a's and b's own last pages
    pool.free(a.block_table)
    assert pool.num_cached_pages == 0 and pool.num_kv_pages == 3  # b still reads both
    pool.free(b.block_table)
    assert pool.num_cached_pages == 2 and pool.num_kv_pages == 0


def test_the_same_tokens_under_two_adapters_or_a_reloaded_adapter_share_nothing() -> None:
    pool, tier = make(x=1, y=1)
    tokens = list(range(12))
    for adapter in ("x", "y", None):
        seq = SequenceState(adapter or "base", adapter, tokens)
        assert run(pool, seq) == []
        finish(pool, seq)
    seq = SequenceState("x again", "x", tokens)
    assert len(run(pool, seq)) == 2
    finish(pool, seq)
    assert pool.evict_if_idle("x")  # unloaded; another folder is read under the name x
    tier.reload("x")
    seq = SequenceState("new x", "x", tokens)
    assert run(pool, seq) == []
    finish(pool, seq)


def test_a_request_that_reports_prompt_logprobs_computes_every_token_but_caches() -> None:
    pool, _ = make()
    a = SequenceState("a", None, list(range(9)), reuse_cached_prefix=False)
    run(pool, a)
    finish(pool, a)
    again = SequenceState("again", None, list(range(9)), reuse_cached_prefix=False)
    assert run(pool, again) == []
    assert pool.stats.prefix_cache_queries == 0
    finish(pool, again)
    assert len(run(pool, SequenceState("b", None, list(range(9))))) == 2


def test_an_idle_adapter_older_than_a_cached_block_is_reclaimed_first() -> None:
    pool, _ = make(num_pages=6, x=2)
    pool.acquire_adapter("x")
    pool.release_adapter("x")  # x idle: least recent
    a = SequenceState("a", None, list(range(9)))
    run(pool, a)
    finish(pool, a)  # 2 cached blocks, more recent than x
    assert [kind for kind, _ in pool.reclaimable] == [ADAPTER, KV_BLOCK, KV_BLOCK]
    pool.allocate(5)  # 6 pages - 2 cached - 2 x = 2 free: x goes first (2 pages), then 1 block
    assert not pool.is_resident("x")
    assert pool.num_cached_pages == 1
    pool.check_invariants()


def test_a_cached_block_older_than_an_idle_adapter_is_reclaimed_first() -> None:
    pool, _ = make(num_pages=6, x=2)
    a = SequenceState("a", None, list(range(9)))
    run(pool, a)
    finish(pool, a)
    pool.acquire_adapter("x")
    pool.release_adapter("x")  # x idle, more recent than the blocks
    # The tail block was released first, so it goes first: the head stays longest.
    _, head = (key for key in pool.reclaimable if key[0] == KV_BLOCK)
    assert head[1] == chain_hash(BASE_MODEL_IDENTITY, [0, 1, 2, 3])
    pool.allocate(4)  # 2 free + both blocks; x stays
    assert pool.is_resident("x") and pool.num_cached_pages == 0
    assert pool.stats.kv_block_evictions == 2
    pool.check_invariants()


def test_a_requests_own_cached_prefix_does_not_count_as_reclaimable() -> None:
    pool, _ = make(num_pages=4)
    a = SequenceState("a", None, list(range(9)))
    run(pool, a)
    finish(pool, a)  # 2 cached, 2 free
    b = SequenceState("b", None, [*range(8), *range(50, 58)])
    cached = pool.cached_prefix(b)
    assert len(cached) == 2
    assert pool.can_allocate(2, None, cached) and not pool.can_allocate(3, None, cached)
    assert pool.can_allocate(4)  # without reading them, both blocks could be reclaimed


def test_blocks_are_shared_only_within_a_cache_scope() -> None:
    pool, _ = make()
    tokens = list(range(10))
    alpha = SequenceState("a", None, tokens, cache_scope="tenant:alpha")
    assert run(pool, alpha) == []
    finish(pool, alpha)
    beta = SequenceState("b", None, tokens, cache_scope="tenant:beta")
    assert run(pool, beta) == [], "the same tokens in another scope share nothing"
    finish(pool, beta)
    open_server = SequenceState("o", None, tokens)
    assert run(pool, open_server) == []
    finish(pool, open_server)
    again = SequenceState("a2", None, tokens, cache_scope="tenant:alpha")
    assert len(run(pool, again)) == 2, "the same scope reuses its full blocks"
