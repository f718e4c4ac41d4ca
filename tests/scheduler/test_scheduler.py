"""The scheduler against a fake pool: order, budget, chunking, admission, preemption, aborts."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fake_pool import FakePool

from loraserve.scheduler import (
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    SequenceState,
    SequenceStatus,
)

SAMPLED_TOKEN = 7


def make(
    num_pages: int = 64,
    block_size: int = 4,
    adapter_pages: dict[str, int] | None = None,
    **config: int,
) -> tuple[Scheduler, FakePool]:
    pool = FakePool(num_pages, block_size, adapter_pages or {})
    return Scheduler(SchedulerConfig(**config), pool), pool


def request(request_id: str, num_prompt_tokens: int, adapter: str | None = None) -> SequenceState:
    return SequenceState(request_id, adapter, list(range(100, 100 + num_prompt_tokens)))


def plan(output: SchedulerOutput) -> list[tuple[str, int]]:
    return [(chunk.seq.request_id, chunk.num_tokens) for chunk in output.chunks]


def step(scheduler: Scheduler, pool: FakePool) -> SchedulerOutput:
    """schedule, then update as an engine would, sampling SAMPLED_TOKEN; checks the pool."""
    output = scheduler.schedule()
    sampled = {chunk.seq.request_id: SAMPLED_TOKEN for chunk in output.chunks if chunk.samples}
    scheduler.update_after_step(output, sampled)
    pool.check_invariants()
    return output


def test_config_validation_names_the_bad_value() -> None:
    with pytest.raises(ValueError, match=r"max_num_seqs must be >= 1, got 0"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match=r"max_num_batched_tokens must be >= max_num_seqs \(8\)"):
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4)
    with pytest.raises(ValueError, match=r"max_waiting_requests must be >= 1, got -1"):
        SchedulerConfig(max_waiting_requests=-1)
    assert SchedulerConfig().max_num_batched_tokens == 2048


def test_importing_the_scheduler_does_not_import_torch() -> None:
    code = "import sys, loraserve.scheduler; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_sequence_state_counts_prompt_and_output() -> None:
    prompt = [1, 2, 3]
    seq = SequenceState("r", None, prompt)
    seq.token_ids.append(9)
    assert prompt == [1, 2, 3], "the caller's prompt list must not grow"
    assert (seq.num_tokens, seq.num_prompt_tokens, seq.num_output_tokens) == (4, 3, 1)
    assert seq.output_token_ids == [9]
    with pytest.raises(ValueError, match="empty prompt"):
        SequenceState("e", None, [])


def test_first_come_first_served() -> None:
    scheduler, pool = make()
    for name in "cab":
        scheduler.add(request(name, 3))
    output = step(scheduler, pool)
    assert plan(output) == [("c", 3), ("a", 3), ("b", 3)]
    assert [seq.arrival_index for seq in (c.seq for c in output.chunks)] == [0, 1, 2]


def test_chunked_prefill_of_a_long_prompt_then_decode() -> None:
    scheduler, pool = make(block_size=4, max_num_batched_tokens=8, max_num_seqs=4)
    seq = request("long", 20)
    scheduler.add(seq)
    expected = [(0, 8, False, 2), (8, 8, False, 4), (16, 4, True, 5), (20, 1, True, 6)]
    for start, num_tokens, samples, num_pages in expected:
        output = step(scheduler, pool)
        (chunk,) = output.chunks
        assert (chunk.start, chunk.num_tokens, chunk.samples) == (start, num_tokens, samples)
        assert chunk.token_ids == seq.token_ids[start : start + num_tokens]
        assert len(seq.block_table) == num_pages
        assert seq.num_computed_tokens == start + num_tokens
    assert seq.output_token_ids == [SAMPLED_TOKEN, SAMPLED_TOKEN]


def test_running_decodes_come_first_and_a_prompt_takes_the_rest_of_the_budget() -> None:
    # The module docstring's example: budget 8, block_size 4.
    scheduler, pool = make(block_size=4, max_num_batched_tokens=8, max_num_seqs=4)
    scheduler.add(request("A", 3))
    step(scheduler, pool)
    scheduler.add(request("B", 12))
    assert plan(step(scheduler, pool)) == [("A", 1), ("B", 7)]
    output = step(scheduler, pool)
    assert plan(output) == [("A", 1), ("B", 5)]
    assert [chunk.samples for chunk in output.chunks] == [True, True]
    assert plan(step(scheduler, pool)) == [("A", 1), ("B", 1)]


def test_token_budget_bounds_every_step() -> None:
    scheduler, pool = make(num_pages=256, block_size=4, max_num_batched_tokens=10, max_num_seqs=4)
    for index, length in enumerate([7, 9, 3, 12, 5]):
        scheduler.add(request(f"r{index}", length))
    for _ in range(12):
        output = step(scheduler, pool)
        assert 0 < output.num_batched_tokens <= 10
        assert scheduler.num_running() <= 4


def test_decode_schedules_one_token_per_running_request() -> None:
    scheduler, pool = make(max_num_batched_tokens=64, max_num_seqs=8)
    for name in "abcd":
        scheduler.add(request(name, 5))
    step(scheduler, pool)
    for _ in range(3):
        output = step(scheduler, pool)
        assert plan(output) == [(name, 1) for name in "abcd"]
        assert all(chunk.samples for chunk in output.chunks)


def test_admission_waits_for_kv_pages_in_strict_order() -> None:
    scheduler, pool = make(num_pages=4, block_size=4)
    scheduler.add(request("a", 12))  # 3 pages
    scheduler.add(request("b", 8))  # 2 pages: does not fit beside a
    scheduler.add(request("c", 2))  # 1 page would fit, but b is ahead of it
    assert plan(step(scheduler, pool)) == [("a", 12)]
    assert scheduler.num_waiting() == 2
    scheduler.finish("a", SequenceStatus.FINISHED_STOPPED)
    assert pool.kv_pages == set()
    assert plan(step(scheduler, pool)) == [("b", 8), ("c", 2)]


def test_admission_counts_the_adapter_pages_and_evicts_idle_adapters() -> None:
    scheduler, pool = make(num_pages=6, block_size=4, adapter_pages={"x": 3, "y": 3})
    scheduler.add(request("a", 4, adapter="x"))  # 1 KV page + 3 adapter pages
    scheduler.add(request("b", 4, adapter="y"))  # needs 4, only 2 free
    assert plan(step(scheduler, pool)) == [("a", 4)]
    assert (pool.users, scheduler.running_adapters(), scheduler.waiting_adapters()) == (
        {"x": 1},
        ["x"],
        ["y"],
    )
    scheduler.finish("a", SequenceStatus.FINISHED_LENGTH)
    assert pool.users == {"x": 0} and "x" in pool.resident  # idle, still resident
    assert plan(step(scheduler, pool)) == [("b", 4)]
    assert pool.evictions == ["x"] and list(pool.resident) == ["y"]


def test_an_idle_adapter_is_not_reclaimable_for_its_own_request() -> None:
    # Found by the property test: counting x's own idle page as reclaimable admits c,
    # then pinning x leaves no page for c's KV. The contract of `can_allocate`.
    scheduler, pool = make(num_pages=3, block_size=4, adapter_pages={"x": 1})
    scheduler.add(request("a", 4, adapter="x"))
    step(scheduler, pool)
    scheduler.finish("a", SequenceStatus.FINISHED_STOPPED)  # x idle, resident: 1 page
    scheduler.add(request("b", 8))  # the 2 free pages
    scheduler.add(request("c", 4, adapter="x"))  # 1 KV page: none free, x is not spare
    assert plan(step(scheduler, pool)) == [("b", 8)]
    scheduler.finish("b", SequenceStatus.FINISHED_STOPPED)
    assert plan(step(scheduler, pool)) == [("c", 4)] and pool.evictions == []


def test_requests_of_one_adapter_pin_it_once_each() -> None:
    scheduler, pool = make(adapter_pages={"x": 2})
    for name in "abc":
        scheduler.add(request(name, 3, adapter="x"))
    step(scheduler, pool)
    assert pool.users == {"x": 3} and pool.num_adapter_pages() == 2
    scheduler.abort("b")
    assert pool.users == {"x": 2}


def test_decode_out_of_pages_preempts_the_latest_request_which_is_recomputed() -> None:
    scheduler, pool = make(num_pages=4, block_size=2)
    b = request("b", 3)
    scheduler.add(request("a", 3))
    scheduler.add(b)
    assert plan(step(scheduler, pool)) == [("a", 3), ("b", 3)]  # 2 pages each
    assert plan(step(scheduler, pool)) == [("a", 1), ("b", 1)]  # 4 tokens: still 2 pages
    output = step(scheduler, pool)  # a needs a 3rd page: b goes
    assert plan(output) == [("a", 1)] and output.preempted == ["b"]
    assert (b.status, b.num_computed_tokens, b.block_table, b.num_preemptions) == (
        SequenceStatus.WAITING,
        0,
        [],
        1,
    )
    assert b.output_token_ids == [SAMPLED_TOKEN, SAMPLED_TOKEN]  # kept for the recompute
    assert len(pool.kv_pages) == 3
    scheduler.finish("a", SequenceStatus.FINISHED_STOPPED)
    output = step(scheduler, pool)
    (chunk,) = output.chunks
    assert (chunk.seq, chunk.start, chunk.num_tokens, chunk.samples) == (b, 0, 5, True)
    assert b.output_token_ids == [SAMPLED_TOKEN] * 3 and len(b.block_table) == 3


def test_the_latest_request_preempts_itself_when_only_it_needs_a_page() -> None:
    scheduler, pool = make(num_pages=4, block_size=2)
    scheduler.add(request("a", 3))  # 4 tokens after step 1: its 2 pages suffice
    scheduler.add(request("b", 4))  # 5 tokens after step 1: needs a 3rd page
    step(scheduler, pool)
    output = step(scheduler, pool)
    assert plan(output) == [("a", 1)] and output.preempted == ["b"]
    assert scheduler.num_waiting() == 1 and len(pool.kv_pages) == 2


def test_no_admission_in_a_step_that_preempted() -> None:
    scheduler, pool = make(num_pages=5, block_size=2)
    scheduler.add(request("a", 3))
    scheduler.add(request("b", 3))
    step(scheduler, pool)  # 4 pages used
    step(scheduler, pool)
    c = request("c", 1)
    scheduler.add(c)
    output = step(scheduler, pool)  # a takes the 5th page; b needs one more and preempts itself
    assert output.preempted == ["b"] and plan(output) == [("a", 1)]
    assert scheduler.num_waiting() == 2 and c.status is SequenceStatus.WAITING  # c would fit
    # b (3 pages) does not fit in the 2 free ones, and c stays behind it: strict FCFS.
    assert plan(step(scheduler, pool)) == [("a", 1)]
    scheduler.finish("a", SequenceStatus.FINISHED_STOPPED)
    assert plan(step(scheduler, pool)) == [("b", 5), ("c", 1)]


def test_abort_from_waiting_and_from_running_frees_everything() -> None:
    scheduler, pool = make(num_pages=4, block_size=4, adapter_pages={"x": 1})
    scheduler.add(request("run", 6, adapter="x"))
    scheduler.add(request("wait", 12, adapter="x"))
    step(scheduler, pool)
    assert scheduler.abort("wait") and scheduler.num_waiting() == 0
    output = scheduler.schedule()
    assert scheduler.abort("run")  # between schedule and update: the update skips it
    assert scheduler.update_after_step(output, {"run": SAMPLED_TOKEN}) == []
    pool.check_invariants()
    assert (pool.kv_pages, pool.users, scheduler.has_unfinished()) == (set(), {"x": 0}, False)
    assert output.chunks[0].seq.status is SequenceStatus.FINISHED_ABORTED
    assert not scheduler.abort("run") and not scheduler.abort("never-added")


def test_max_num_seqs_bounds_the_running_requests() -> None:
    scheduler, pool = make(max_num_seqs=2, max_num_batched_tokens=64)
    for name in "abc":
        scheduler.add(request(name, 2))
    assert plan(step(scheduler, pool)) == [("a", 2), ("b", 2)]
    assert plan(step(scheduler, pool)) == [("a", 1), ("b", 1)]
    scheduler.finish("a", SequenceStatus.FINISHED_LENGTH)
    assert plan(step(scheduler, pool)) == [("b", 1), ("c", 2)]


def test_a_request_larger_than_the_pool_waits_without_looping() -> None:
    scheduler, pool = make(num_pages=2, block_size=4)
    scheduler.add(request("huge", 12))  # the engine should have rejected it
    for _ in range(3):
        assert scheduler.schedule().is_empty
    assert scheduler.num_waiting() == 1 and pool.kv_pages == set()


def test_add_and_finish_reject_misuse() -> None:
    scheduler, _ = make()
    scheduler.add(request("a", 2))
    with pytest.raises(ValueError, match="already scheduled"):
        scheduler.add(request("a", 2))
    with pytest.raises(ValueError, match="FINISHED_"):
        scheduler.finish("a", SequenceStatus.RUNNING)
    with pytest.raises(KeyError):
        scheduler.finish("nope", SequenceStatus.FINISHED_STOPPED)
    scheduler.finish("a", SequenceStatus.FINISHED_STOPPED)  # from waiting
    assert not scheduler.has_unfinished()


def test_is_full_at_max_waiting_requests() -> None:
    scheduler, _ = make(max_waiting_requests=2)
    scheduler.add(request("a", 2))
    assert not scheduler.is_full()
    scheduler.add(request("b", 2))
    assert scheduler.is_full()


def test_a_request_whose_adapter_is_being_read_is_skipped_and_keeps_its_place() -> None:
    scheduler, pool = make(adapter_pages={"cold": 1, "hot": 1}, max_num_seqs=2)
    pool.not_ready = {"cold"}
    for seq in (request("a", 4, "cold"), request("b", 4, "hot"), request("c", 4), request("d", 4)):
        scheduler.add(seq)
    assert plan(step(scheduler, pool)) == [("c", 4), ("b", 4)]  # `a` waits, two seats filled
    pool.not_ready.clear()
    scheduler.finish("b", SequenceStatus.FINISHED_LENGTH)
    scheduler.finish("c", SequenceStatus.FINISHED_LENGTH)
    assert plan(step(scheduler, pool)) == [("d", 4), ("a", 4)]  # `a` first, then `d`
    assert [chunk.seq.request_id for chunk in scheduler.schedule().chunks] == ["d", "a"]


def test_a_ready_request_that_does_not_fit_blocks_those_behind_it() -> None:
    """Only adapter reads are skipped: a long prompt is not starved by short ones."""
    scheduler, _ = make(num_pages=4, block_size=4)
    scheduler.add(request("long", 20))  # 5 pages: never fits this pool
    scheduler.add(request("short", 2))
    assert scheduler.schedule().is_empty


def test_adapters_of_waiting_requests_are_prefetched_into_free_pages() -> None:
    scheduler, pool = make(
        num_pages=8,
        adapter_pages={"x": 2, "y": 2, "big": 9},
        max_num_seqs=1,
        max_adapter_prefetch=4,
    )
    for seq in (
        request("a", 4),
        request("b", 4, "x"),
        request("c", 4, "big"),
        request("d", 4, "y"),
    ):
        scheduler.add(seq)
    output = step(scheduler, pool)
    assert plan(output) == [("a", 4)]  # one seat
    assert pool.prefetched == ["x", "y"]  # `big` does not fit the free pages
    assert set(output.adapter_loads) == {"x", "y"}  # copied during this step
    assert pool.num_reclaimable_pages() == 4  # idle until their requests run
