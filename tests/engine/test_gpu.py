"""The engine on CUDA with the Triton kernels (skipped without a GPU)."""

from __future__ import annotations

import pytest
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
