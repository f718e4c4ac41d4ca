"""The engine on CUDA with the Triton kernels (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from factories import greedy_reference, make_model, peft_model_for
from test_exactness import REQUESTS, make_adapters

from loraserve import LLM, SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    base = make_model(root / "model", "llama-gqa", seed=1)
    folders = make_adapters(base, root)
    return root, base, folders


def assert_equals_peft(llm: LLM, base, folders) -> None:
    """Greedy tokens of the mixed batch of REQUESTS equal PEFT's for each adapter alone."""
    prompts = [llm.tokenizer.encode(text) for _, text in REQUESTS]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(
        prompt_token_ids=prompts, sampling_params=params, adapter=[a for a, _ in REQUESTS]
    )
    peft_models = {name: peft_model_for(base, folder) for name, folder in folders.items()}
    for index, (adapter, _) in enumerate(REQUESTS):
        model = base if adapter is None else peft_models[adapter]
        tokens, _ = greedy_reference(model, prompts[index], 32)
        assert outputs[index].token_ids == tokens, f"request {index} ({adapter}) differs from PEFT"


@pytest.mark.parametrize("kernel_backend", ["triton", "torch"])
def test_cuda_float32_equals_peft(assets, kernel_backend: str) -> None:
    root, base, folders = assets
    llm = LLM(
        root / "model",
        adapters=folders,
        device="cuda",
        dtype="float32",
        kernel_backend=kernel_backend,
        pool_pages=512,  # several engines in one process: do not size the pool by free memory
    )
    assert_equals_peft(llm, base, folders)
    llm.engine.memory.check_invariants()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_half_precision_runs_mixed_batches(assets, dtype: str) -> None:
    """Half precision cannot match float32 PEFT token for token; it must run, and
    Triton and torch backends must agree on the first greedy tokens."""
    root, _, folders = assets
    results = {}
    for backend in ("triton", "torch"):
        llm = LLM(
            root / "model",
            adapters=folders,
            device="cuda",
            dtype=dtype,
            kernel_backend=backend,
            pool_pages=512,
        )
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        outs = llm.generate(
            [text for _, text in REQUESTS], params, adapter=[a for a, _ in REQUESTS]
        )
        results[backend] = [out.token_ids[0] for out in outs]
        llm.engine.memory.check_invariants()
    agree = sum(a == b for a, b in zip(results["triton"], results["torch"], strict=True))
    assert agree >= len(REQUESTS) - 1


def test_cuda_disk_tier_and_side_stream_copies_equal_peft(assets) -> None:
    """Adapters read from disk on a loader thread, copied in on the side stream (two pool
    slots, one pinned: copies, evictions and waits every few steps), against PEFT."""
    root, base, folders = assets
    llm = LLM(
        root / "model",
        device="cuda",
        dtype="float32",
        kernel_backend="triton",
        pool_pages=512,
        adapter_dir=root,
        pinned_adapters=["pattern"],
        max_cpu_loras=1,
        max_resident_adapters=2,
        max_adapter_prefetch=2,
    )
    assert_equals_peft(llm, base, folders)
    memory = llm.engine.memory
    memory.check_invariants()
    assert memory.stats.adapter_evictions > 0
    assert llm.engine.runner.pool.copies is not None
    torch.cuda.synchronize()
    assert llm.engine.runner.drain_load_seconds(), "copy timings come from CUDA events"


def test_side_stream_copies_land_in_their_pages(assets) -> None:
    """The copy of each load is in the pool once a forward has waited for its slot."""
    root, _, folders = assets
    llm = LLM(root / "model", adapters=folders, device="cuda", dtype="float32", pool_pages=512)
    engine = llm.engine
    names = list(folders)
    for name in names:
        engine.memory.prefetch_adapter(name)
    loads = engine.memory.take_loads()
    pool = engine.runner.pool
    pool.load(loads)
    pool.wait_for({load.slot for load in loads})
    torch.cuda.synchronize()
    for load in loads:
        pages = torch.tensor(load.pages, device="cuda")
        torch.testing.assert_close(pool.pages[pages].cpu(), load.adapter.pages[0], rtol=0, atol=0)
        assert pool.slot_max_rank[load.slot] == load.adapter.max_rank
