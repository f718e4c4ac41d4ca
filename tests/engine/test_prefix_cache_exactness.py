"""Prefix caching changes no token: loraserve with cached prefixes equals PEFT.

Requests share a long "system prompt" within one adapter and across adapters and the
base model; the same prefix under two adapters must not share KV (the hit counter says
so). Also under a pool small enough to preempt and a budget small enough to chunk, and
after an adapter is unloaded and another folder is loaded under its name (its old
blocks must not be read again). float32, greedy, 16 new tokens.
"""

from __future__ import annotations

import pytest
from factories import greedy_reference, make_adapter, make_model, peft_model_for

from loraserve import LLM, SamplingParams
from loraserve.memory import adapter_store

NEW_TOKENS = 16
BLOCK = 8
SYSTEM = list(range(5, 5 + 41))  # 5 full blocks and one token
SUFFIXES = ([200, 201, 202], [210, 7, 9, 11, 13], [220])
ADAPTERS = {
    "a": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "b": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "c": dict(r=6, lora_alpha=6, target_modules=["k_proj", "v_proj", "up_proj"]),
}


@pytest.fixture(autouse=True)
def named_by_file_version(monkeypatch) -> None:
    """Every adapter file counts as settled: a folder read again is named as it was the first
    time (a file read while it is still new is named by its pages' digest, and by its
    version once it has settled: a folder first read within memory/adapter_store.py's
    SETTLED_SECONDS of being written would miss its old blocks once)."""
    monkeypatch.setattr(adapter_store, "SETTLED_SECONDS", 0.0)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Llama with GQA, three adapters, and PEFT's greedy tokens for each prompt."""
    root = tmp_path_factory.mktemp("prefix")
    base = make_model(root / "model", "llama-gqa", seed=5)
    folders = {
        name: make_adapter(base, root / name, seed=20 + i, **config)
        for i, (name, config) in enumerate(ADAPTERS.items())
    }
    models = {None: base} | {name: peft_model_for(base, path) for name, path in folders.items()}
    prompts = [SYSTEM + suffix for suffix in SUFFIXES]
    references = {
        (name, index): greedy_reference(model, prompt, NEW_TOKENS)[0]
        for name, model in models.items()
        for index, prompt in enumerate(prompts)
    }
    return root / "model", folders, prompts, references


def generate(llm: LLM, assets, requests: list[tuple[str | None, int]]) -> None:
    """Run `requests` ((adapter, prompt index)) in one call; each equals PEFT's tokens."""
    _, _, prompts, references = assets
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(
        prompt_token_ids=[prompts[index] for _, index in requests],
        sampling_params=params,
        adapter=[adapter for adapter, _ in requests],
    )
    for (adapter, index), output in zip(requests, outputs, strict=True):
        assert output.token_ids == references[(adapter, index)], f"{adapter} prompt {index}"
    llm.engine.memory.check_invariants([])


def hits(llm: LLM) -> int:
    return llm.engine.memory.stats.prefix_cache_hits


def test_a_shared_prefix_is_reused_within_an_adapter_never_across(assets) -> None:
    model, folders, _, _ = assets
    llm = LLM(model, adapters=folders, device="cpu", dtype="float32", block_size=BLOCK)
    generate(llm, assets, [("a", 0)])
    assert hits(llm) == 0
    generate(llm, assets, [("b", 1), (None, 1)])  # the same tokens, other adapters: no hit
    assert hits(llm) == 0
    generate(llm, assets, [("a", 1)])  # a's 5 full system blocks
    assert hits(llm) == 5 * BLOCK
    generate(llm, assets, [("a", 2), ("b", 0), (None, 2), ("c", 0)])  # c: never seen
    assert hits(llm) == 5 * BLOCK + 3 * 5 * BLOCK
    generate(llm, assets, [("a", 0)])  # its own blocks, from the first call
    assert hits(llm) == 5 * 5 * BLOCK
    assert llm.engine.memory.num_cached_pages > 0 and llm.engine.memory.num_kv_pages == 0


def test_exact_with_caching_under_preemption_and_chunked_prefill(assets) -> None:
    model, folders, _, _ = assets
    llm = LLM(
        model,
        adapters=folders,
        device="cpu",
        dtype="float32",
        block_size=BLOCK,
        pool_pages=20,
        max_num_batched_tokens=8,
        max_num_seqs=6,
    )
    requests = [(adapter, index) for index in range(3) for adapter in ("a", None, "b")]
    generate(llm, assets, requests)
    assert llm.engine.num_preemptions > 0, "the pool was meant to be too small for all requests"
    assert hits(llm) > 0, "chunked admissions were meant to find their neighbours' blocks"
    generate(llm, assets, requests[::-1])


def test_a_folder_loaded_again_under_the_same_name_reads_no_stale_kv(assets) -> None:
    model, folders, _, references = assets
    llm = LLM(model, adapters={"a": folders["a"]}, device="cpu", dtype="float32", block_size=BLOCK)
    generate(llm, assets, [("a", 0)])
    llm.engine.unregister_adapter("a")
    llm.engine.register_adapter("a", folders["c"])  # other weights, the same name
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    for index in (1, 0):
        (output,) = llm.generate(
            prompt_token_ids=[assets[2][index]], sampling_params=params, adapter="a"
        )
        assert output.token_ids == references[("c", index)]
    assert hits(llm) == 5 * BLOCK  # prompt 0 found prompt 1's blocks, computed by the new a
    # The old a's weights again: its blocks, still cached, are right for it.
    llm.engine.unregister_adapter("a")
    llm.engine.register_adapter("a", folders["a"])
    generate(llm, assets, [("a", 2)])
    assert hits(llm) == 2 * 5 * BLOCK


def test_off_computes_every_token(assets) -> None:
    model, folders, _, _ = assets
    llm = LLM(
        model,
        adapters=folders,
        device="cpu",
        dtype="float32",
        block_size=BLOCK,
        enable_prefix_caching=False,
    )
    generate(llm, assets, [("a", 0)])
    generate(llm, assets, [("a", 1), ("a", 0)])
    stats = llm.engine.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits, stats.num_cached_kv_pages) == (
        0,
        0,
        0,
    )


def test_prompt_logprobs_are_computed_for_every_prompt_token(assets) -> None:
    """Cached blocks have no logits: a request reporting prompt logprobs reads no cache
    (and is not counted as a query), and its logprobs equal those of a cold run."""
    model, folders, prompts, _ = assets
    llm = LLM(model, adapters=folders, device="cpu", dtype="float32", block_size=BLOCK)
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=1)
    (cold,) = llm.generate(prompt_token_ids=[prompts[0]], sampling_params=params, adapter="a")
    queries = llm.engine.memory.stats.prefix_cache_queries
    (warm,) = llm.generate(prompt_token_ids=[prompts[0]], sampling_params=params, adapter="a")
    assert (hits(llm), llm.engine.memory.stats.prefix_cache_queries) == (0, queries) == (0, 0)
    cold_logprobs, warm_logprobs = cold.outputs[0].prompt_logprobs, warm.outputs[0].prompt_logprobs
    assert cold_logprobs is not None and len(cold_logprobs) == len(prompts[0])
    assert warm_logprobs == cold_logprobs
    generate(llm, assets, [("a", 1)])  # its blocks were cached all the same
    assert hits(llm) == 5 * BLOCK
