"""Random workloads through a simulated engine loop; pool and scheduler invariants every step.

The loop is the engine's: add arrivals, abort some, schedule, "run" the step, sample
a token (the sequence's position, so lost or duplicated tokens show), finish requests
at their max length. Pools are small so that admission blocks, adapters get evicted
and decodes preempt; some adapters are "being read from disk" for a few steps (their
requests are skipped meanwhile); requests come from a few tenants, under FCFS or VTC.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

from fake_pool import FakePool
from hypothesis import event, given, settings
from hypothesis import strategies as st

from loraserve.scheduler import Scheduler, SchedulerConfig, SequenceState, SequenceStatus


@dataclass
class Spec:
    """One request of a workload."""

    num_prompt_tokens: int
    max_output_tokens: int
    adapter: str | None
    tenant: str | None
    arrival_step: int
    abort_step: int | None
    abort_mid_step: bool  # abort between schedule() and update_after_step()


@dataclass
class Workload:
    block_size: int
    num_pages: int
    adapter_pages: dict[str, int]
    ready_step: dict[str, int]
    """The step from which each adapter is ready (0: from the start)."""
    config: SchedulerConfig
    specs: list[Spec]


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    adapter_pages = {f"lora{i}": draw(st.integers(1, 5)) for i in range(draw(st.integers(0, 4)))}
    ready_step = {name: draw(st.sampled_from([0, 0, 3, 10])) for name in adapter_pages}
    max_num_seqs = draw(st.integers(1, 6))
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=draw(st.integers(max_num_seqs, 32)),
        policy=draw(st.sampled_from(["fcfs", "vtc"])),
        max_adapter_prefetch=draw(st.integers(0, 2)),
    )
    spec = st.builds(
        Spec,
        num_prompt_tokens=st.integers(1, 40),
        max_output_tokens=st.integers(1, 12),
        adapter=st.sampled_from([None, *adapter_pages]),
        tenant=st.sampled_from([None, "t1", "t2"]),
        arrival_step=st.integers(0, 15),
        abort_step=st.none() | st.integers(0, 60),
        abort_mid_step=st.booleans(),
    )
    return Workload(
        block_size=draw(st.sampled_from([1, 2, 4, 8])),
        num_pages=draw(st.integers(4, 40)),
        adapter_pages=adapter_pages,
        ready_step=ready_step,
        config=config,
        specs=draw(st.lists(spec, min_size=1, max_size=12)),
    )


def pages_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def fits_alone(spec: Spec, workload: Workload) -> bool:
    """The engine's check before `add`: the request's longest KV (the last sampled token
    is never computed) plus its adapter fit the pool with nothing else in it."""
    longest = spec.num_prompt_tokens + spec.max_output_tokens - 1
    adapter = workload.adapter_pages.get(spec.adapter, 0) if spec.adapter else 0
    return pages_for(longest, workload.block_size) + adapter <= workload.num_pages


def check_step(
    scheduler: Scheduler, pool: FakePool, seqs: list[SequenceState], in_order: bool
) -> None:
    """What must hold between steps (`in_order`: FCFS and no adapter was ever not ready)."""
    pool.check_invariants()
    running = [seq for seq in seqs if seq.status is SequenceStatus.RUNNING]
    waiting = [seq for seq in seqs if seq.status is SequenceStatus.WAITING]
    assert (scheduler.num_running(), scheduler.num_waiting()) == (len(running), len(waiting))
    assert len(running) <= scheduler.config.max_num_seqs
    held = [page for seq in running for page in seq.block_table]
    assert sorted(held) == sorted(pool.kv_pages), "KV pages held == the running block tables"
    assert pool.num_adapter_pages() == sum(pool.adapter_pages[name] for name in pool.resident)
    for seq in running:
        assert len(seq.block_table) == pages_for(seq.num_computed_tokens, pool.block_size)
        assert seq.num_computed_tokens < seq.num_tokens
    for seq in seqs:
        if seq.status is not SequenceStatus.RUNNING:
            assert seq.block_table == [] and (
                seq.status.is_finished or seq.num_computed_tokens == 0
            )
    pins = Counter(seq.adapter for seq in running if seq.adapter is not None)
    assert {name: users for name, users in pool.users.items() if users} == dict(pins)
    if in_order and running and waiting:  # every running request arrived before every waiting
        assert max(seq.arrival_index for seq in running) < min(s.arrival_index for s in waiting)


def engine_step(
    scheduler: Scheduler,
    pool: FakePool,
    spec_of: dict[str, Spec],
    mid_step_aborts: list[SequenceState],
) -> None:
    """schedule, check the plan, abort some requests mid-step, sample, finish at max length."""
    output = scheduler.schedule()
    assert output.num_batched_tokens <= scheduler.config.max_num_batched_tokens
    assert len({id(chunk.seq) for chunk in output.chunks}) == len(output.chunks)
    for chunk in output.chunks:
        assert chunk.num_tokens >= 1 and chunk.start == chunk.seq.num_computed_tokens
        end = chunk.start + chunk.num_tokens
        assert len(chunk.seq.block_table) == pages_for(end, pool.block_size)
        assert chunk.samples == (end == chunk.seq.num_tokens)
    if output.preempted:
        event("preempted")
    for seq in mid_step_aborts:
        scheduler.abort(seq.request_id)
    # The token sampled at position i is i, so a lost or repeated token shows.
    sampled = {c.seq.request_id: c.seq.num_tokens for c in output.chunks if c.samples}
    for seq in scheduler.update_after_step(output, sampled):
        if seq.num_output_tokens >= spec_of[seq.request_id].max_output_tokens:
            scheduler.finish(seq.request_id, SequenceStatus.FINISHED_LENGTH)


@settings(max_examples=200, deadline=None)
@given(workloads())
def test_random_workloads_keep_the_invariants_and_finish(workload: Workload) -> None:
    pool = FakePool(workload.num_pages, workload.block_size, workload.adapter_pages)
    scheduler = Scheduler(workload.config, pool)
    accepted = [spec for spec in workload.specs if fits_alone(spec, workload)]
    last_arrival = max(spec.arrival_step for spec in workload.specs)
    seqs: list[SequenceState] = []
    spec_of: dict[str, Spec] = {}
    # Liveness bound: once every adapter is ready, each step the first admitted running
    # request (or the first ready one admitted when none runs) computes >= 1 token and is
    # never preempted; it needs < P + M of them.
    last_ready = max(workload.ready_step.values(), default=0)
    max_steps = max(last_arrival, last_ready) + 1
    max_steps += sum(s.num_prompt_tokens + s.max_output_tokens for s in accepted)
    in_order = workload.config.policy == "fcfs" and not last_ready
    for step in range(max_steps + 1):
        if step > last_arrival and not scheduler.has_unfinished():
            break
        pool.not_ready = {name for name, ready in workload.ready_step.items() if ready > step}
        for index, spec in enumerate(accepted):
            if spec.arrival_step == step:
                tokens = list(range(spec.num_prompt_tokens))
                seq = SequenceState(f"r{index}", spec.adapter, tokens, spec.tenant)
                scheduler.add(seq)
                seqs.append(seq)
                spec_of[seq.request_id] = spec
        aborts = [seq for seq in seqs if spec_of[seq.request_id].abort_step == step]
        for seq in aborts:
            if not spec_of[seq.request_id].abort_mid_step:
                scheduler.abort(seq.request_id)
        mid_step = [seq for seq in aborts if spec_of[seq.request_id].abort_mid_step]
        engine_step(scheduler, pool, spec_of, mid_step)
        check_step(scheduler, pool, seqs, in_order)
    else:
        raise AssertionError(f"livelock: requests left after {max_steps} steps")

    for seq in seqs:
        assert seq.status.is_finished
        if seq.status is SequenceStatus.FINISHED_LENGTH:
            assert seq.num_output_tokens == spec_of[seq.request_id].max_output_tokens
        assert seq.token_ids == list(range(seq.num_tokens))
    # Only idle resident adapters hold pages at the end.
    assert pool.kv_pages == set() and not any(pool.users.values())
    assert len(pool.free_pages) + pool.num_adapter_pages() == pool.num_total_pages


@settings(max_examples=100, deadline=None)
@given(workloads())
def test_vtc_with_one_tenant_plans_exactly_as_fcfs(workload: Workload) -> None:
    """No API keys means one tenant: VTC must then change nothing."""
    runs = []
    for policy in ("fcfs", "vtc"):
        config = dataclasses.replace(workload.config, policy=policy)
        pool = FakePool(workload.num_pages, workload.block_size, workload.adapter_pages)
        scheduler = Scheduler(config, pool)
        plans = []
        for index, spec in enumerate(s for s in workload.specs if fits_alone(s, workload)):
            scheduler.add(SequenceState(f"r{index}", spec.adapter, [1] * spec.num_prompt_tokens))
        for _ in range(40):
            output = scheduler.schedule()
            plans.append([(c.seq.request_id, c.num_tokens) for c in output.chunks])
            sampled = {c.seq.request_id: 1 for c in output.chunks if c.samples}
            for seq in scheduler.update_after_step(output, sampled):
                if seq.num_output_tokens >= 3:
                    scheduler.finish(seq.request_id, SequenceStatus.FINISHED_LENGTH)
        runs.append(plans)
    assert runs[0] == runs[1]
