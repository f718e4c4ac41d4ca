"""Pinning a set of adapters that fits the pool changes nothing a step does (issue 27).

The same requests run three ways: every adapter pinned, every adapter registered but
not pinned, and every adapter read from its folder on its first request (no workers: the
read happens as the request is added, so the run is deterministic). Step for step the
plans hold the same chunks (request, first position, tokens) and every request gets the
same tokens; only where each adapter's copy is first planned may differ (at start for a
pin).
"""

from __future__ import annotations

import pytest
from factories import make_adapter, make_model
from fake_runner import FakeRunner

from loraserve.engine.core.config import build_config
from loraserve.engine.core.core import EngineCore
from loraserve.engine.core.request import EngineRequest
from loraserve.engine.core.sampling_params import SamplingParams

NAMES = ("a", "b", "c", "d", "e")
# Few seats and a small token budget, so that admission, chunking and the order of the
# waiting queue decide every step: a pin that changed any of them would show.
OPTIONS = {"max_num_seqs": 4, "max_num_batched_tokens": 12, "block_size": 8, "pool_pages": 64}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pinning")
    base = make_model(root / "model", "llama", seed=3)
    adapters = {
        name: make_adapter(base, root / name, seed=i, r=4, target_modules=["q_proj", "v_proj"])
        for i, name in enumerate(NAMES)
    }
    return root / "model", adapters


def run_steps(assets, how: str) -> tuple[list[list[tuple[str, int, int]]], dict[str, list[int]]]:
    """Every step's chunks as (request, start, tokens), and every request's tokens."""
    model, adapters = assets
    config = build_config(str(model), device="cpu", adapter_load_workers=0, **OPTIONS)
    core = EngineCore(config, runner_factory=FakeRunner)
    if how != "on first use":
        for name, folder in adapters.items():
            core.register_adapter(name, folder, pinned=how == "pinned")
    assert sorted(core.memory.pinned_adapters()) == (list(NAMES) if how == "pinned" else [])
    for index in range(15):
        name = NAMES[(index * 3) % len(NAMES)]
        prompt = [7 + index] * (3 + index % 9)
        params = SamplingParams(max_tokens=2 + index % 5, temperature=0.0, ignore_eos=True)
        path = str(adapters[name]) if how == "on first use" else None
        core.add_request(EngineRequest(f"r{index}", prompt, params, name, path))
    produced: dict[str, list[int]] = {}
    while core.has_unfinished_requests():
        for output in core.step():
            produced.setdefault(output.request_id, []).extend(output.new_token_ids)
        core.memory.check_invariants()
    runner = core.runner
    assert isinstance(runner, FakeRunner)
    plans = [
        sorted((chunk.seq.request_id, chunk.start, chunk.num_tokens) for chunk in plan.chunks)
        for plan in runner.plans
        if plan.chunks
    ]
    return plans, produced


def test_a_pinned_set_that_fits_runs_step_for_step_as_unpinned(assets) -> None:
    pinned_plans, pinned_tokens = run_steps(assets, "pinned")
    for how in ("registered", "on first use"):
        plans, produced = run_steps(assets, how)
        assert len(plans) == len(pinned_plans), f"{how}: another number of steps"
        for index, (plan, pinned_plan) in enumerate(zip(plans, pinned_plans, strict=True)):
            assert plan == pinned_plan, f"{how}: step {index} differs"
        assert produced == pinned_tokens
    assert max(len(plan) for plan in pinned_plans) == OPTIONS["max_num_seqs"]
