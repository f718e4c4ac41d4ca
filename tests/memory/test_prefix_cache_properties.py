"""Prefix caching under random workloads: the real scheduler and pool bookkeeping, with a
shadow of what each page holds, so that reading a wrong block shows.

Prompts share prefixes (a few "system prompts" over a tiny vocabulary), pools are small
(admission blocks, decodes preempt, cached blocks and idle adapters are reclaimed),
requests are aborted between or during steps, and adapters are reloaded with other
weights while idle (the same name, another identity). The shadow: when a chunk is
computed, each of its positions writes (adapter identity, every token up to it) into
its page slot; before a chunk is computed, every position before it must hold exactly
what this request would have written there. After every step: the pool's invariants
with the running block tables (shared pages counted once, reference counts equal to
the tables that hold them), and each request holds ceil(computed / block_size) pages.
"""

from __future__ import annotations

from dataclasses import dataclass

from fake_tier import FakeTier
from hypothesis import event, given, settings
from hypothesis import strategies as st

from loraserve.memory.pool import UnifiedPool
from loraserve.memory.prefix_cache import BASE_MODEL_IDENTITY
from loraserve.scheduler import Scheduler, SchedulerConfig, SequenceState, SequenceStatus

SYSTEM_PROMPTS = ([], [1, 2, 3, 1, 2, 3, 1], [1, 2, 3, 1, 0, 0, 2, 2, 1, 3, 3, 0, 1, 2])


@dataclass
class Spec:
    prompt: list[int]
    max_output_tokens: int
    adapter: str | None
    arrival_step: int
    abort_step: int | None
    abort_mid_step: bool


@dataclass
class Workload:
    block_size: int
    num_pages: int
    adapter_pages: dict[str, int]
    reload_steps: dict[int, str]
    """step -> adapter reloaded with other weights then (if idle)."""
    config: SchedulerConfig
    specs: list[Spec]


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    adapter_pages = {f"lora{i}": draw(st.integers(1, 3)) for i in range(draw(st.integers(0, 3)))}
    prompt = st.builds(
        lambda system, own: [*system, *own],
        st.sampled_from(SYSTEM_PROMPTS),
        st.lists(st.integers(0, 3), min_size=1, max_size=8),
    )
    spec = st.builds(
        Spec,
        prompt=prompt,
        max_output_tokens=st.integers(1, 10),
        adapter=st.sampled_from([None, *adapter_pages]),
        arrival_step=st.integers(0, 12),
        abort_step=st.none() | st.none() | st.integers(0, 40),
        abort_mid_step=st.booleans(),
    )
    max_num_seqs = draw(st.integers(1, 6))
    reloads = st.dictionaries(st.integers(0, 40), st.sampled_from(sorted(adapter_pages)))
    return Workload(
        block_size=draw(st.sampled_from([1, 2, 4])),
        num_pages=draw(st.integers(6, 30)),
        adapter_pages=adapter_pages,
        reload_steps=draw(reloads) if adapter_pages else {},
        config=SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=draw(st.integers(max_num_seqs, 24)),
            policy=draw(st.sampled_from(["fcfs", "vtc"])),
            max_adapter_prefetch=draw(st.integers(0, 2)),
        ),
        specs=draw(st.lists(spec, min_size=1, max_size=12)),
    )


class Shadow:
    """What each page slot holds: (identity, tokens up to and including that position)."""

    def __init__(self, tier: FakeTier, block_size: int) -> None:
        self.tier, self.block_size = tier, block_size
        self.slots: dict[tuple[int, int], tuple[bytes, tuple[int, ...]]] = {}

    def identity(self, seq: SequenceState) -> bytes:
        return BASE_MODEL_IDENTITY if seq.adapter is None else self.tier.host(seq.adapter).identity

    def compute(self, seq: SequenceState, start: int, num_tokens: int) -> None:
        """Check what the chunk reads, then write what it computes."""
        identity, size = self.identity(seq), self.block_size
        for position in range(start):
            slot = (seq.block_table[position // size], position % size)
            expected = (identity, tuple(seq.token_ids[: position + 1]))
            assert self.slots.get(slot) == expected, (
                f"{seq.request_id} reads wrong KV at {position}"
            )
        for position in range(start, start + num_tokens):
            slot = (seq.block_table[position // size], position % size)
            self.slots[slot] = (identity, tuple(seq.token_ids[: position + 1]))


def fits_alone(spec: Spec, workload: Workload) -> bool:
    longest = len(spec.prompt) + spec.max_output_tokens - 1
    adapter = workload.adapter_pages[spec.adapter] if spec.adapter else 0
    return -(-longest // workload.block_size) + adapter <= workload.num_pages


def step(scheduler: Scheduler, shadow: Shadow, specs: dict[str, Spec], aborts: list) -> None:
    output = scheduler.schedule()
    assert output.num_batched_tokens <= scheduler.config.max_num_batched_tokens
    for chunk in output.chunks:
        assert chunk.num_tokens >= 1, "a request fully cached must still compute a token"
        shadow.compute(chunk.seq, chunk.start, chunk.num_tokens)
    if output.preempted:
        event("preempted")
    for seq in aborts:
        scheduler.abort(seq.request_id)
    sampled = {c.seq.request_id: c.seq.num_tokens for c in output.chunks if c.samples}
    for seq in scheduler.update_after_step(output, sampled):
        if seq.num_output_tokens >= specs[seq.request_id].max_output_tokens:
            scheduler.finish(seq.request_id, SequenceStatus.FINISHED_LENGTH)


def check(pool: UnifiedPool, scheduler: Scheduler, seqs: list[SequenceState]) -> None:
    running = [seq for seq in seqs if seq.status is SequenceStatus.RUNNING]
    pool.check_invariants([seq.block_table for seq in running])
    assert scheduler.num_running() == len(running)
    for seq in running:
        assert len(seq.block_table) == -(-seq.num_computed_tokens // pool.block_size)
    for seq in seqs:
        if seq.status is not SequenceStatus.RUNNING:
            assert seq.block_table == []


@settings(max_examples=300, deadline=None)
@given(workloads())
def test_shared_blocks_keep_the_pool_exact_and_every_read_right(workload: Workload) -> None:
    tier = FakeTier(dict(workload.adapter_pages))
    pool = UnifiedPool(workload.num_pages, workload.block_size, 2, tier)
    scheduler = Scheduler(workload.config, pool)
    shadow = Shadow(tier, workload.block_size)
    accepted = [spec for spec in workload.specs if fits_alone(spec, workload)]
    specs = {f"r{index}": spec for index, spec in enumerate(accepted)}
    seqs: list[SequenceState] = []
    last_event = max([s.arrival_step for s in workload.specs] + list(workload.reload_steps))
    max_steps = last_event + 1 + sum(len(s.prompt) + s.max_output_tokens for s in accepted)
    for number in range(max_steps + 1):
        if number > last_event and not scheduler.has_unfinished():
            break
        name = workload.reload_steps.get(number)
        if name is not None and not pool.is_in_use(name):
            pool.evict_if_idle(name)
            tier.reload(name)
            event("adapter reloaded")
        for request_id, spec in specs.items():
            if spec.arrival_step == number:
                seqs.append(SequenceState(request_id, spec.adapter, spec.prompt))
                scheduler.add(seqs[-1])
        aborts = [seq for seq in seqs if specs[seq.request_id].abort_step == number]
        for seq in aborts:
            if not specs[seq.request_id].abort_mid_step:
                scheduler.abort(seq.request_id)
        mid_step = [seq for seq in aborts if specs[seq.request_id].abort_mid_step]
        step(scheduler, shadow, specs, mid_step)
        check(pool, scheduler, seqs)
    else:
        raise AssertionError(f"livelock: requests left after {max_steps} steps")
    if pool.stats.prefix_cache_hits:
        event("prefix cache hit")
    for seq in seqs:
        assert seq.status.is_finished
        assert seq.token_ids[len(specs[seq.request_id].prompt) :] == list(
            range(len(specs[seq.request_id].prompt), seq.num_tokens)
        )
    assert pool.num_kv_pages == 0
    assert pool.num_cached_pages + pool.num_adapter_pages + pool.num_free_pages == (
        pool.num_total_pages
    )
