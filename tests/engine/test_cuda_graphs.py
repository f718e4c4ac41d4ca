"""CUDA-graph decode (skipped without a GPU): a replay computes exactly what the same padded
batch computes eagerly, for several batch sizes with mixed adapters, and the engine's greedy
tokens with graphs equal those without."""

from __future__ import annotations

import pytest
import torch
from factories import make_model
from test_exactness import REQUESTS, make_adapters

from loraserve import LLM, SamplingParams
from loraserve.engine.core.request import EngineRequest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    base = make_model(root / "model", "llama-gqa", seed=1)
    folders = make_adapters(base, root)
    return root, folders


def make_llm(assets, **options) -> LLM:
    root, folders = assets
    return LLM(
        root / "model",
        adapters=folders,
        device="cuda",
        dtype="float32",
        kernel_backend="triton",
        pool_pages=512,
        max_num_seqs=32,
        **options,
    )


@pytest.mark.parametrize("batch_size", [1, 3, 8, 17, 32])
def test_replay_equals_eager_on_the_same_padded_batch(assets, batch_size: int) -> None:
    llm = make_llm(assets)
    core, runner = llm.engine, llm.engine.runner
    assert runner.graphs.buckets, "graphs are captured on CUDA by default"
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for index in range(batch_size):
        adapter, text = REQUESTS[index % len(REQUESTS)]
        core.add_request(EngineRequest(str(index), llm.tokenizer.encode(text), params, adapter))
    core.step()  # the prefills
    plan = core.scheduler.schedule()  # a decode step of every request
    runner.pool.load(plan.adapter_loads)
    bucket = runner.graphs.bucket_for(plan.chunks)
    assert bucket is not None and bucket >= batch_size
    batch = runner.metadata.build(plan.chunks, runner.pool, pad_to=bucket)
    eager = runner.model.forward(batch)[:batch_size].clone()
    replayed = runner.graphs.replay(bucket, batch)[:batch_size].clone()
    assert torch.equal(eager, replayed)
    for request_id in list(core.requests):
        core.abort_request(request_id)
    core.memory.check_invariants()


def test_greedy_tokens_with_graphs_equal_eager(assets) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=3)
    texts, adapters = [t for _, t in REQUESTS] * 3, [a for a, _ in REQUESTS] * 3
    graphs = make_llm(assets).generate(texts, params, adapter=adapters)
    eager = make_llm(assets, enforce_eager=True).generate(texts, params, adapter=adapters)
    for with_graphs, without in zip(graphs, eager, strict=True):
        assert with_graphs.token_ids == without.token_ids
        pairs = zip(
            with_graphs.outputs[0].logprobs or [], without.outputs[0].logprobs or [], strict=True
        )
        for a, b in pairs:
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
