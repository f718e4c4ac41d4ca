"""The engine core against a fake runner: the step flows one way, stops, aborts, preemption.

The fake runner (fake_runner.py) samples `last token + 1`, so every expected output
is known without a model, and the plans it received can be inspected."""

from __future__ import annotations

import functools

import pytest
from factories import make_adapter, make_model
from fake_runner import FakeRunner

from loraserve.engine.core.config import RESIDENT_HEADROOM, build_config
from loraserve.engine.core.core import EngineCore
from loraserve.engine.core.request import EngineRequest
from loraserve.engine.core.sampling_params import SamplingParams
from loraserve.kernels.constants import NO_ADAPTER


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("core")
    base = make_model(root / "model", "llama", seed=2)
    adapters = {
        name: make_adapter(base, root / name, seed=i, r=4, target_modules=["q_proj"])
        for i, name in enumerate(["a", "b", "c"])
    }
    return root / "model", adapters


def make_core(assets, **options) -> EngineCore:
    model, adapters = assets
    core = EngineCore(build_config(str(model), device="cpu", **options), runner_factory=FakeRunner)
    for name, folder in adapters.items():
        core.register_adapter(name, folder)
    return core


def run(core: EngineCore) -> dict[str, list]:
    """Step until done; every request's outputs in order."""
    outputs: dict[str, list] = {}
    for _ in range(10_000):
        if not core.has_unfinished_requests():
            return outputs
        for output in core.step():
            outputs.setdefault(output.request_id, []).append(output)
        core.memory.check_invariants()
    raise AssertionError("the engine did not finish")


def tokens(outputs) -> list[int]:
    return [token for output in outputs for token in output.new_token_ids]


GREEDY = functools.partial(SamplingParams, temperature=0.0, ignore_eos=True)


def test_a_step_runs_chunks_grouped_by_adapter_and_loads_each_adapter_once(assets) -> None:
    core = make_core(assets)
    runner = core.runner
    assert isinstance(runner, FakeRunner)
    for index, adapter in enumerate(["b", None, "a", "b", None, "a"]):
        core.add_request(EngineRequest(f"r{index}", [5, 6, 7], GREEDY(max_tokens=3), adapter))
    outputs = run(core)
    assert {rid: tokens(outs) for rid, outs in outputs.items()} == {
        f"r{i}": [8, 9, 10] for i in range(6)
    }
    for plan in runner.plans:
        slots = [chunk.slot for chunk in plan.chunks]
        assert slots == sorted(slots), "chunks of one adapter are next to each other"
    first = runner.plans[0]
    assert [chunk.slot == NO_ADAPTER for chunk in first.chunks].count(True) == 2
    assert sorted(name for name, _ in runner.loaded) == ["a", "b"], "each adapter loaded once"
    assert len(runner.requests) == 6, "the runner learns that requests ended with its next step"
    core.add_request(EngineRequest("next", [5], GREEDY(max_tokens=1)))
    core.step()
    assert set(runner.requests) == {"next"}
    assert core.memory.num_kv_pages == 0


def test_a_full_batch_may_name_as_many_adapters_as_it_has_sequences(assets) -> None:
    """By default the adapter slots cover a whole batch of distinct adapters (the slot table
    capped a 2000-adapter trace's batches at 128 sequences of 256: issue 27)."""
    model, adapters = assets
    num_seqs = 160  # past the old fixed 128 slots
    core = EngineCore(
        build_config(str(model), device="cpu", max_num_seqs=num_seqs, pool_pages=4096),
        runner_factory=FakeRunner,
    )
    assert core.config.resident_adapter_slots == num_seqs + RESIDENT_HEADROOM
    for index in range(num_seqs):
        core.register_adapter(f"tenant-{index}", adapters["a"])
    for index in range(num_seqs):
        core.add_request(
            EngineRequest(f"r{index}", [5, 6, 7], GREEDY(max_tokens=2), f"tenant-{index}")
        )
    run(core)
    runner = core.runner
    assert isinstance(runner, FakeRunner)
    widest = max(len({chunk.slot for chunk in plan.chunks}) for plan in runner.plans)
    assert widest == num_seqs, "every sequence ran beside every other, each with its adapter"


def test_outputs_are_deltas_with_finish_reasons(assets) -> None:
    core = make_core(assets)
    core.add_request(EngineRequest("len", [5], GREEDY(max_tokens=4)))
    core.add_request(EngineRequest("stop", [5], GREEDY(max_tokens=9, stop_token_ids=[8])))
    core.add_request(
        EngineRequest("min", [5], GREEDY(max_tokens=9, stop_token_ids=[6], min_tokens=2))
    )
    outputs = run(core)
    assert all(len(output.new_token_ids) == 1 for outs in outputs.values() for output in outs)
    assert tokens(outputs["len"]) == [6, 7, 8, 9]
    assert outputs["len"][-1].finish_reason == "length"
    assert tokens(outputs["stop"]) == [6, 7, 8]
    assert (outputs["stop"][-1].finish_reason, outputs["stop"][-1].stop_reason) == ("stop", 8)
    # min_tokens: 6 comes first but may not stop the request before two tokens are out.
    assert tokens(outputs["min"]) == [6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert [o.finish_reason for o in outputs["len"][:-1]] == [None] * 3


def test_eos_stops_unless_ignored(assets) -> None:
    core = make_core(assets)
    eos, vocab = core.info.eos_token_ids[0], core.arch.vocab_size
    start = (eos - 2) % vocab  # the fake runner counts up from it to EOS in two tokens
    core.add_request(EngineRequest("eos", [start], SamplingParams(max_tokens=5, temperature=0.0)))
    core.add_request(EngineRequest("ignored", [start], GREEDY(max_tokens=5)))
    outputs = run(core)
    assert tokens(outputs["eos"]) == [(start + 1) % vocab, eos]
    assert outputs["eos"][-1].finish_reason == "stop"
    assert outputs["eos"][-1].stop_reason is None  # EOS is not reported, as in vLLM
    assert len(tokens(outputs["ignored"])) == 5


def test_abort_frees_everything(assets) -> None:
    core = make_core(assets, pool_pages=32)
    core.add_request(EngineRequest("x", list(range(3, 40)), GREEDY(max_tokens=50), "c"))
    core.add_request(EngineRequest("y", [3], GREEDY(max_tokens=50), "c"))
    core.step()
    assert core.memory.num_kv_pages > 0 and core.memory.is_in_use("c")
    assert core.abort_request("x") and core.abort_request("y")
    assert not core.abort_request("y")
    assert core.memory.num_kv_pages == 0 and not core.memory.is_in_use("c")
    core.add_request(EngineRequest("z", [3], GREEDY(max_tokens=1)))
    core.step()
    assert set(core.runner.requests) == {"z"}  # type: ignore[attr-defined]
    core.memory.check_invariants()


def test_preemption_recomputes_and_keeps_the_outputs(assets) -> None:
    """A pool too small for every request at once: the latest are preempted, recomputed,
    and every request still gets exactly its tokens."""
    core = make_core(assets, pool_pages=12, block_size=8, max_num_batched_tokens=16, max_num_seqs=8)
    for index in range(6):
        core.add_request(
            EngineRequest(
                f"r{index}", [10 * index + 1] * 9, GREEDY(max_tokens=20), "abc"[index % 3]
            )
        )
    outputs = run(core)
    assert core.num_preemptions > 0
    for index in range(6):
        start = 10 * index + 1
        assert tokens(outputs[f"r{index}"]) == list(range(start + 1, start + 21))
    assert core.memory.num_kv_pages == 0


def test_a_group_of_completions_is_added_whole_or_not_at_all(assets) -> None:
    core = make_core(assets, max_waiting_requests=3)
    subs = [(f"g-{i}", GREEDY(max_tokens=2)) for i in range(2)]
    core.add_requests([EngineRequest(i, [4, 5], params, "a") for i, params in subs])
    from loraserve.errors import QueueFullError, UnknownAdapterError

    with pytest.raises(QueueFullError):  # 2 waiting + 2 more > 3
        core.add_requests(
            [EngineRequest("h-0", [4], GREEDY()), EngineRequest("h-1", [4], GREEDY())]
        )
    with pytest.raises(UnknownAdapterError):
        core.add_requests([EngineRequest("k-0", [4], GREEDY(), "nope")])
    assert sorted(core.requests) == ["g-0", "g-1"]
    run(core)
    core.memory.check_invariants()


def test_host_ram_holds_its_budget_once_the_requests_end(assets) -> None:
    """Adapters in use are kept in host RAM past `max_cpu_loras`; when their last request
    ends, the budget holds again, without waiting for another read."""
    model, adapters = assets
    config = build_config(str(model), device="cpu", max_cpu_loras=1, adapter_load_workers=0)
    core = EngineCore(config, runner_factory=FakeRunner)
    for index, name in enumerate(["a", "b", "c"]):
        request = EngineRequest(
            f"r{index}", [5, 6], GREEDY(max_tokens=2), name, str(adapters[name])
        )
        core.add_request(request)
    core.step()  # collects the three reads: kept, all three in use
    assert len(core.catalog.host_adapters()) == 3
    run(core)
    assert len(core.catalog.host_adapters()) == 1
