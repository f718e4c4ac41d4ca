"""A request that fails in a step fails alone: it finishes with `error`, its pages go back,
and the requests batched with it get the tokens they get without it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from factories import make_adapter, make_model, make_overflowing_adapter

from loraserve import LLM, SamplingParams
from loraserve.engine.sampling.sampler import NOT_FINITE
from loraserve.errors import InvalidRequestError

NORMAL = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=10, temperature=0.9, seed=3, ignore_eos=True)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("failures")
    base = make_model(root / "model", "llama", seed=2)
    make_adapter(base, root / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"])
    make_overflowing_adapter(base, root / "broken")
    return root / "model", {"a": root / "a", "broken": root / "broken"}


@pytest.fixture(scope="module")
def llm(assets: tuple[Path, dict[str, Path]]) -> LLM:
    model, adapters = assets
    return LLM(model, adapters=adapters, device="cpu", dtype="float32", max_adapter_weight=1e38)


def assert_pool_is_back(llm: LLM) -> None:
    assert not llm.engine.has_unfinished_requests()
    llm.engine.memory.check_invariants()
    assert llm.engine.memory.num_kv_pages == 0


@pytest.mark.parametrize("kernel_backend", ["native", "torch"])
def test_a_row_the_sampler_cannot_sample_fails_alone(
    assets: tuple[Path, dict[str, Path]], kernel_backend: str
) -> None:
    """An adapter whose output overflows gives NaN logits: its request alone fails."""
    model, adapters = assets
    other = LLM(
        model,
        adapters,
        device="cpu",
        dtype="float32",
        kernel_backend=kernel_backend,
        max_adapter_weight=1e38,  # the broken adapter is refused by default
    )
    alone = other.generate(["hello", "SELECT"], [NORMAL, SEEDED], adapter=[None, "a"])
    outs = other.generate(
        ["hello", "hello", "SELECT"], [NORMAL, NORMAL, SEEDED], adapter=[None, "broken", "a"]
    )
    assert outs[1].finish_reason == "error" and outs[1].token_ids == []
    assert NOT_FINITE in (outs[1].outputs[0].error or "")
    assert [outs[0].token_ids, outs[2].token_ids] == [alone[0].token_ids, alone[1].token_ids]
    assert outs[0].finish_reason == outs[2].finish_reason == "length"
    assert_pool_is_back(other)


def test_stop_token_ids_that_leave_nothing_before_min_tokens_are_refused(llm: LLM) -> None:
    everything = list(range(llm.engine.arch.vocab_size))
    with pytest.raises(InvalidRequestError, match="whole vocabulary") as caught:
        llm.generate(["hello"], SamplingParams(min_tokens=1, stop_token_ids=everything))
    assert caught.value.param == "stop_token_ids"
    assert llm.generate(["hello"], SamplingParams(max_tokens=2, stop_token_ids=everything))
    assert_pool_is_back(llm)


def test_an_error_while_detokenizing_fails_that_request_alone(
    llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    processor = llm._processor
    add = processor.add_request

    def add_with_a_broken_detokenizer(request: Any) -> Any:
        subs = add(request)
        if request.prompt_token_ids == llm.tokenizer.encode("broken"):
            for sub_id in (sub.request_id for sub in subs):

                def explode(token: int) -> str:
                    raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")

                detokenizer = processor._completions[sub_id].detokenizer
                monkeypatch.setattr(detokenizer, "add_token", explode)
        return subs

    monkeypatch.setattr(processor, "add_request", add_with_a_broken_detokenizer)
    alone = llm.generate(["hello"], NORMAL)[0]
    outs = llm.generate(["hello", "broken"], NORMAL)
    assert outs[0].token_ids == alone.token_ids
    assert outs[1].finish_reason == "error" and "injected" in (outs[1].outputs[0].error or "")
    assert_pool_is_back(llm)


def test_stop_token_ids_outside_the_vocabulary_are_refused(llm: LLM) -> None:
    vocab_size = llm.engine.arch.vocab_size
    with pytest.raises(InvalidRequestError) as caught:
        llm.generate(["hello"], SamplingParams(stop_token_ids=[3, vocab_size]))
    assert caught.value.param == "stop_token_ids"
    assert_pool_is_back(llm)


def test_a_huge_token_list_is_refused_by_its_length_first(llm: LLM) -> None:
    """Out-of-vocabulary ids too, but the length is what is reported: it is checked
    before the ids are looked at one by one."""
    limit = llm.engine.info.max_model_len
    with pytest.raises(InvalidRequestError, match=f"{limit * 4} tokens"):
        llm.generate(prompt_token_ids=[[10**9] * (limit * 4)])
    assert_pool_is_back(llm)
