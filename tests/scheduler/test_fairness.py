"""Fairness between tenants: VTC against FCFS, on a simulated overloaded server.

The scheduler runs against a fake pool with room to spare, so seats (`max_num_seqs`) are
the only bottleneck: 4 seats, requests of 8 prompt and 8 output tokens, so the server
completes about one request every 2 steps. A heavy tenant sends one request per step
(twice what the server can do, ten times the light tenant's load); the light tenant
sends one every 10 steps, far below its fair half. The bounds, in steps of the
simulation:

- under VTC the light tenant is served as if it were alone: every request it sent
  (none in the last 50 steps) completes, so it receives every token it asked for
  (about 18% of the tokens served, while the heavy tenant gets the rest and its
  backlog grows), and its mean time to first token is at most 10 steps (a seat frees
  within 8);
- under FCFS its requests queue behind the heavy tenant's backlog, which grows without
  bound: its mean time to first token passes 100 steps and most of its requests do
  not complete within the run.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import pytest
from fake_pool import FakePool

from loraserve.scheduler.config import SchedulerConfig
from loraserve.scheduler.request import SequenceState, SequenceStatus
from loraserve.scheduler.scheduler import Scheduler

PROMPT, OUTPUT, SEATS, STEPS = 8, 8, 4, 600


@dataclass
class Run:
    """What a simulation measured, per tenant."""

    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    completed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    ttft: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    tokens: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Prompt and output tokens computed for the tenant."""


def simulate(policy: str, every: dict[str, int], weights: dict[str, float] | None = None) -> Run:
    """`every[tenant]`: that tenant sends one request every so many steps."""
    config = SchedulerConfig(max_num_seqs=SEATS, max_num_batched_tokens=64, policy=policy)
    scheduler = Scheduler(config, FakePool(100_000, 16, {}))
    run, arrival = Run(), {}
    for step in range(STEPS):
        for tenant, period in every.items():
            if step % period == 0 and step < STEPS - 50:
                request_id = f"{tenant}-{step}"
                weight = (weights or {}).get(tenant, 1.0)
                seq = SequenceState(request_id, None, [3] * PROMPT, tenant, weight)
                scheduler.add(seq)
                arrival[request_id] = step
                run.sent[tenant] += 1
        plan = scheduler.schedule()
        for chunk in plan.chunks:
            run.tokens[chunk.seq.tenant or ""] += chunk.num_tokens
        sampled = {c.seq.request_id: 5 for c in plan.chunks if c.samples}
        for seq in scheduler.update_after_step(plan, sampled):
            tenant = seq.tenant or ""
            if seq.num_output_tokens == 1:
                run.ttft[tenant].append(step - arrival[seq.request_id])
            if seq.num_output_tokens == OUTPUT:
                scheduler.finish(seq.request_id, SequenceStatus.FINISHED_LENGTH)
                run.completed[tenant] += 1
    return run


def mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else float("inf")


def share(run: Run, tenant: str) -> float:
    return run.tokens[tenant] / sum(run.tokens.values())


def test_vtc_serves_the_light_tenant_as_if_alone() -> None:
    run = simulate("vtc", {"heavy": 1, "light": 10})
    assert run.completed["light"] == run.sent["light"]
    assert mean(run.ttft["light"]) <= 10
    assert run.tokens["light"] == run.sent["light"] * (PROMPT + OUTPUT - 1)
    assert run.completed["heavy"] < run.sent["heavy"]  # the server was overloaded


def test_fcfs_lets_the_heavy_tenant_starve_the_light_one() -> None:
    run = simulate("fcfs", {"heavy": 1, "light": 10})
    assert mean(run.ttft["light"]) > 100
    assert run.completed["light"] < run.sent["light"] / 2
    assert share(run, "light") < 0.12  # about its share of the arrivals: first come, first served


@pytest.mark.parametrize("weights", [{"a": 1.0, "b": 1.0}, {"a": 2.0, "b": 1.0}])
def test_vtc_shares_in_proportion_to_weights(weights: dict[str, float]) -> None:
    """Two tenants both sending more than the server can do get tokens in the ratio of
    their weights, within 10%."""
    run = simulate("vtc", {"a": 1, "b": 1}, weights)
    ratio = run.tokens["a"] / run.tokens["b"]
    expected = weights["a"] / weights["b"]
    assert abs(ratio / expected - 1) <= 0.1, ratio
