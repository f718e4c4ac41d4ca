"""`ThreadGovernor`: one thread when the CPU is shared and many threads stall, many when they
pay; probing the other choice costs little. Driven with a clock that the work advances by
what a step costs on the thread count torch is set to (the real `torch.set_num_threads`)."""

from __future__ import annotations

import pytest
import torch

from loraserve.engine.core.config import available_cores
from loraserve.engine.runner.cpu_threads import PROBE_BUDGET, ThreadGovernor, one_thread


class Machine:
    """A clock, and steps whose cost depends on the threads they run on."""

    def __init__(self, cost: dict[int, float]) -> None:
        self.cost = cost
        self.now = 0.0
        self.spent: dict[int, float] = {}

    def clock(self) -> float:
        return self.now

    def step(self) -> int:
        threads = torch.get_num_threads()
        self.now += self.cost[threads]
        self.spent[threads] = self.spent.get(threads, 0.0) + self.cost[threads]
        return threads


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run(governor: ThreadGovernor, machine: Machine, steps: int, tokens: int = 16) -> list[int]:
    return [governor.run(tokens, machine.step) for _ in range(steps)]


def test_a_quiet_machine_keeps_every_thread_and_probes_little() -> None:
    machine = Machine({2: 1.0, 1: 1.25})
    governor = ThreadGovernor(2, machine.clock)
    used = run(governor, machine, 400)
    assert used[:2] == [2, 1]  # each choice measured once
    assert used[-50:].count(2) >= 47
    assert machine.spent[1] <= 1.25 * (2 + 400 / PROBE_BUDGET)


def test_a_shared_machine_falls_back_to_one_thread_and_rarely_pays_for_many() -> None:
    machine = Machine({2: 30.0, 1: 1.0})  # a busy process stalls every parallel region
    governor = ThreadGovernor(2, machine.clock)
    used = run(governor, machine, 2000)
    assert used[2:].count(1) >= 1990
    total = machine.now
    assert machine.spent[2] <= total * 1.2 / PROBE_BUDGET + 30.0  # the first step, then probes
    # the busy process goes: many threads pay again, found within a probe's budget
    machine.cost = {2: 0.8, 1: 1.0}
    later = run(governor, machine, int(PROBE_BUDGET * 30 / 1.0) + 50)
    assert later[-40:].count(2) >= 38  # and one probe of one thread now and then


def test_step_sizes_are_measured_apart_and_one_thread_is_left_alone() -> None:
    machine = Machine({2: 1.0, 1: 1.25})
    governor = ThreadGovernor(2, machine.clock)
    run(governor, machine, 10, tokens=4)
    probes = governor.num_probes
    assert run(governor, machine, 2, tokens=1000)[1] == 1  # a new size class: measured too
    assert governor.num_probes == probes + 1
    torch.set_num_threads(3)
    machine.cost[3] = 1.0
    single = ThreadGovernor(1, machine.clock)
    run(single, machine, 5)
    assert torch.get_num_threads() == 3 and single.num_probes == 0


def test_available_cores_are_within_the_affinity() -> None:
    import os

    assert 1 <= available_cores() <= len(os.sched_getaffinity(0))


def test_one_thread_inside_the_block_and_the_count_restored_after() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), one_thread():
            raise RuntimeError("a failed copy")
        assert torch.get_num_threads() == 2  # restored on the way out of an error too
        torch.set_num_threads(1)
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
