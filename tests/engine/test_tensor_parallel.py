"""Tensor parallelism on the CPU: 2 ranks over gloo (rank 0 in this process, rank 1 a worker
process), greedy tokens equal to PEFT's on one process.

Two families throughout: Llama with GQA (2 KV heads over 2 ranks: one each) and Phi-3 (fused
qkv and gate/up checkpoints and adapters); Qwen2 and Gemma 3 for the mixed batch. The adapters are test_exactness's: ranks 4-16, rsLoRA,
rank/alpha patterns, DoRA, beside base-model requests in the same batch. Also with prefix
cache hits, under preemption and chunked prefill, with adapters read from disk at run time;
a model whose heads do not divide, and a rank that dies.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from factories import make_model
from test_exactness import (
    check_against_peft,
    check_under_preemption_and_chunked_prefill,
    prepare_family,
)

from loraserve import LLM, SamplingParams
from loraserve.errors import EngineError
from loraserve.models.tensor_parallel import Shard, output_rows, shard_arch, vocab_rows

pytestmark = pytest.mark.slow
TP = dict(tensor_parallel_size=2)


@pytest.fixture(scope="module", params=["llama-gqa", "phi3"])
def family(request, tmp_path_factory):
    """test_exactness's models, adapters and PEFT answers, for two families."""
    return prepare_family(request.param, tmp_path_factory)


def test_mixed_adapters_equal_peft_on_two_ranks(family) -> None:
    root, options, prompts, references = family
    llm = LLM(root / "model", **options, **TP)
    assert llm.engine.runner.collectives.shard == Shard(0, 2)
    check_against_peft(llm, prompts, references)
    collectives = llm.engine.runner.collectives
    assert collectives.calls["all_reduce"] > 0 and collectives.calls["all_gather"] > 0
    llm.engine.memory.check_invariants()
    assert llm.engine.memory.num_kv_pages == 0
    # The prefix cache: the same prompts again start from their cached blocks.
    hits = llm.engine.memory.stats.prefix_cache_hits
    check_against_peft(llm, prompts, references, num_logprobs=5)
    assert llm.engine.memory.stats.prefix_cache_hits > hits


@pytest.fixture(scope="module", params=["qwen2", "gemma3"])
def other_family(request, tmp_path_factory):
    """Families whose pieces the split touches otherwise: q/k/v biases (Qwen2); scaled
    embeddings, q/k norms, sliding-window layers with their own RoPE, soft-capped logits and
    Gemma's four norms (Gemma 3)."""
    return prepare_family(request.param, tmp_path_factory)


def test_other_families_equal_peft_on_two_ranks(other_family) -> None:
    root, options, prompts, references = other_family
    check_against_peft(LLM(root / "model", **options, **TP), prompts, references)


def test_two_ranks_under_preemption_and_chunked_prefill(family) -> None:
    check_under_preemption_and_chunked_prefill(family, **TP)


def test_two_ranks_read_adapters_at_run_time(family) -> None:
    """Adapters listed in a folder and read when first named (every rank gets its shard of
    each), one in host RAM at a time, two pool slots (evictions and reads again)."""
    root, options, prompts, references = family
    family_options = {key: value for key, value in options.items() if key != "adapters"}
    llm = LLM(
        root / "model",
        **family_options,
        **TP,
        adapter_dir=root,
        pinned_adapters=["pattern"],
        max_cpu_loras=1,
        max_resident_adapters=2,
        adapter_load_workers=1,
    )
    assert llm.engine.catalog.names() == ["pattern"]  # pinned; the others read when named
    check_against_peft(llm, prompts, references, num_logprobs=5)
    memory = llm.engine.memory
    assert memory.stats.adapter_evictions > 0, "two slots were meant to be too few"
    assert memory.pinned_adapters() == ["pattern"]
    memory.check_invariants()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpus_equal_peft(family) -> None:
    """The same on 2 GPUs over NCCL (Triton kernels, float32, eager: no graphs under TP)."""
    root, options, prompts, references = family
    llm = LLM(root / "model", **dict(options, device="cuda"), **TP)
    check_against_peft(llm, prompts, references)
    llm.engine.memory.check_invariants()


def test_a_model_whose_heads_do_not_divide_is_refused_in_one_line(tmp_path: Path) -> None:
    make_model(tmp_path / "model", "llama-gqa", seed=1)  # 4 heads, 2 KV heads
    with pytest.raises(ValueError) as refused:
        LLM(tmp_path / "model", device="cpu", tensor_parallel_size=3)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("tensor_parallel_size 3 does not divide the model's 4 attention")


def test_kv_heads_fewer_than_ranks_are_replicated(tmp_path: Path) -> None:
    """vLLM's rule: with 2 KV heads over 4 ranks, ranks 0-1 hold head 0 and ranks 2-3 head 1."""
    base = make_model(tmp_path / "model", "llama-gqa", seed=1)
    from loraserve.models.hf_config import load_arch

    arch = load_arch(tmp_path / "model")
    assert (arch.num_heads, arch.num_kv_heads) == (4, 2), base.config
    assert shard_arch(arch, 4).num_kv_heads == 1
    heads = [
        output_rows(arch, "k_proj", Shard(rank, 4)).start // arch.head_dim for rank in range(4)
    ]
    assert heads == [0, 0, 1, 1]
    first, rows = vocab_rows(arch.vocab_size, Shard(3, 4))
    assert first == 3 * rows and 4 * rows >= arch.vocab_size


def test_a_rank_that_dies_ends_the_engine_with_a_clear_error(family) -> None:
    """Rank 1 killed (as by the OOM killer) while requests run: the generate call raises
    EngineError naming the rank, at once rather than hanging; later calls fail the same."""
    root, options, prompts, _ = family
    llm = LLM(root / "model", **options, **TP)
    runner = llm.engine.runner
    worker = runner.processes[0]
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    started = time.monotonic()

    def kill_soon() -> None:
        time.sleep(1.0)
        os.kill(worker.pid, signal.SIGKILL)

    import threading

    threading.Thread(target=kill_soon, daemon=True).start()
    with pytest.raises(EngineError, match="tensor-parallel rank 1 exited"):
        llm.generate(prompt_token_ids=prompts * 4, sampling_params=params, use_tqdm=False)
    assert time.monotonic() - started < 60
    with pytest.raises(EngineError, match="rank 1"):
        runner.check()
