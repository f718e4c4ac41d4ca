"""The unified pool never leaks: a property test over random workloads on the real engine.

Random prompts, adapters, output lengths, aborts and adapter churn (register,
unregister) run through the real engine with a small pool; after every step,
pages in use + pages free == pages total, and once every request has ended only
resident idle adapters hold pages. The same with the disk tier: adapters read on a
loader thread while the steps go on (one idle adapter in host RAM, two pool slots, a
pinned adapter), so aborts and preemptions land while reads and copies are in flight.
"""

from __future__ import annotations

import contextlib

import pytest
from factories import make_adapter, make_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraserve import LLM, SamplingParams
from loraserve.engine.core.request import EngineRequest
from loraserve.errors import InvalidRequestError

ADAPTER_CONFIGS = [
    dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    dict(r=33, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj", "o_proj"]),
    dict(r=3, lora_alpha=3, target_modules=["k_proj", "down_proj"]),
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    base = make_model(root / "model", "llama-gqa", seed=3)
    adapters = {
        f"a{i}": make_adapter(base, root / f"a{i}", seed=i, **config)
        for i, config in enumerate(ADAPTER_CONFIGS)
    }
    return root / "model", adapters


request_strategy = st.tuples(
    st.integers(1, 40),  # prompt length
    st.integers(1, 12),  # max tokens
    st.sampled_from([None, "a0", "a1", "a2"]),
)
action_strategy = st.one_of(
    st.tuples(st.just("add"), request_strategy),
    st.tuples(st.just("abort"), st.integers(0, 50)),
    st.tuples(st.just("step"), st.integers(1, 3)),
    st.tuples(st.just("unregister"), st.sampled_from(["a0", "a1", "a2"])),
)


SMALL_ENGINE = dict(
    device="cpu", dtype="float32", block_size=8, max_num_batched_tokens=24, max_num_seqs=8
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(actions=st.lists(action_strategy, min_size=5, max_size=40), pool_pages=st.integers(8, 24))
def test_pages_used_plus_free_is_total(assets, actions, pool_pages) -> None:
    model, adapters = assets
    llm = LLM(model, adapters=adapters, pool_pages=pool_pages, **SMALL_ENGINE)
    run_and_check(llm, adapters, actions)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(actions=st.lists(action_strategy, min_size=5, max_size=40), pool_pages=st.integers(10, 24))
def test_pages_used_plus_free_is_total_with_reads_in_flight(assets, actions, pool_pages) -> None:
    model, adapters = assets
    llm = LLM(
        model,
        adapter_dir=model.parent,
        pinned_adapters=["a2"],
        pool_pages=pool_pages,
        max_cpu_loras=1,
        max_resident_adapters=2,
        adapter_load_workers=1,
        **SMALL_ENGINE,
    )
    run_and_check(llm, adapters, actions, listed=True)
    # unloading drops the pin; a later request may read the folder again, unpinned
    unloaded = ("unregister", "a2") in actions
    assert llm.engine.memory.pinned_adapters() == ([] if unloaded else ["a2"])


def check(engine) -> None:
    """The pool's invariants, with every block table: shared cached pages counted right."""
    engine.memory.check_invariants([state.seq.block_table for state in engine.requests.values()])


def run_and_check(llm: LLM, adapters: dict, actions: list, listed: bool = False) -> None:
    """Play `actions` on the engine, checking the pool after each step and at the end."""
    engine, memory = llm.engine, llm.engine.memory
    added: list[str] = []
    for kind, value in actions:
        if kind == "add":
            prompt_len, max_tokens, adapter = value
            if adapter in engine.retiring:
                continue  # being unloaded once its requests end: it takes no new ones
            if adapter is not None and adapter not in engine.catalog and not listed:
                engine.register_adapter(adapter, adapters[adapter])  # churn: back again
            path = None if adapter is None else str(adapters[adapter])
            request_id = f"r{len(added)}"
            try:
                engine.add_request(
                    EngineRequest(
                        request_id,
                        list(range(2, 2 + prompt_len)),
                        SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                        adapter,
                        adapter_path=path if listed else None,
                    )
                )
                added.append(request_id)
            except InvalidRequestError:
                pass  # cannot fit this small pool: refused up front, nothing held
        elif kind == "abort" and added:
            engine.abort_request(added[value % len(added)])
        elif kind == "unregister":
            with contextlib.suppress(KeyError):  # gone, or already being unloaded
                engine.unregister_adapter(value)
        elif kind == "step":
            for _ in range(value):
                engine.step()
                check(engine)
        check(engine)
    for _ in range(20_000):  # turns of 1 ms waits at most while adapters are read
        if not engine.has_unfinished_requests():
            break
        engine.step_or_wait(engine.wait_for_adapter_reads)
        check(engine)
    assert not engine.has_unfinished_requests()
    assert memory.num_kv_pages == 0
    # Only idle resident adapters and cached KV blocks (nothing reads them) hold pages.
    assert memory.num_cached_pages + memory.num_adapter_pages + memory.num_free_pages == (
        memory.num_total_pages
    )
    assert not any(memory.is_in_use(name) for name in memory.resident_adapters())
