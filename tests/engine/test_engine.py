"""The engine's request handling: the LLM API, stops, seeds, errors, adapters."""

from __future__ import annotations

import pytest
import torch
from factories import make_adapter, make_model

from loraserve import LLM, SamplingParams
from loraserve.engine.core.config import available_cores, build_config, with_serving_threads
from loraserve.errors import AdapterError, InvalidRequestError, QueueFullError, UnknownAdapterError


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    base = make_model(root / "model", "llama-gqa", seed=5)
    sql = make_adapter(
        base, root / "sql", seed=1, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]
    )
    fr = make_adapter(base, root / "fr", seed=2, r=5, lora_alpha=5, target_modules=["down_proj"])
    return root, {"sql": sql, "fr": fr}


@pytest.fixture(scope="module")
def llm(assets) -> LLM:
    root, adapters = assets
    return LLM(root / "model", adapters=adapters, device="cpu", dtype="float32")


def test_issue_example(llm: LLM) -> None:
    outs = llm.generate(
        ["SELECT", "Bonjour", "hello"],
        SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True),
        adapter=["sql", "fr", None],
    )
    assert [len(out.token_ids) for out in outs] == [32, 32, 32]
    assert all(out.finish_reason == "length" for out in outs)
    assert outs[0].text == llm.tokenizer.decode(outs[0].token_ids)
    # The adapters change the output: each differs from the base model on the same prompt.
    base = llm.generate(
        ["SELECT", "Bonjour"], SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    )
    assert outs[0].token_ids != base[0].token_ids
    assert outs[1].token_ids != base[1].token_ids


def test_seeded_sampling_is_reproducible_and_batch_independent(llm: LLM) -> None:
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = llm.generate(["hello world"], params, adapter="sql")[0]
    crowd = llm.generate(
        ["hello world", "SELECT", "Bonjour"],
        [params, SamplingParams(max_tokens=5), params],
        adapter=["sql", "fr", None],
    )
    assert crowd[0].token_ids == alone.token_ids


def test_n_completions_differ_and_are_indexed(llm: LLM) -> None:
    out = llm.generate(
        ["hello"], SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    )[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_stop_string_truncates_text(llm: LLM) -> None:
    free = llm.generate(["hello"], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[
        0
    ]
    stop = free.text[5:8]
    assert stop.strip(), "the greedy text should have some visible characters to stop on"
    out = llm.generate(
        ["hello"], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop=[stop])
    )[0]
    assert out.finish_reason == "stop"
    assert out.outputs[0].stop_reason == stop
    assert out.text == free.text[: free.text.index(stop)]


def test_stop_token_id(llm: LLM) -> None:
    free = llm.generate(["hello"], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[
        0
    ]
    token = free.token_ids[3]
    out = llm.generate(
        ["hello"],
        SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, stop_token_ids=[token]),
    )[0]
    first = free.token_ids.index(token)
    assert out.token_ids == free.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == token


def test_prompt_too_long_names_both_numbers(llm: LLM) -> None:
    limit = llm.engine.info.max_model_len
    with pytest.raises(InvalidRequestError, match=f"{limit + 5} tokens.*{limit}"):
        llm.generate(prompt_token_ids=[[3] * (limit + 5)])
    with pytest.raises(InvalidRequestError, match="maximum context length"):
        llm.generate(prompt_token_ids=[[3] * 10], sampling_params=SamplingParams(max_tokens=limit))
    assert not llm.engine.has_unfinished_requests()


def test_unknown_adapter_and_bad_tokens_are_refused_whole(llm: LLM) -> None:
    with pytest.raises(UnknownAdapterError, match="nope"):
        llm.generate(["a", "b"], adapter=["sql", "nope"])
    with pytest.raises(InvalidRequestError, match="token ids"):
        llm.generate(prompt_token_ids=[[1, 2, 10**6]])
    assert not llm.engine.has_unfinished_requests()  # the good one was withdrawn too
    llm.engine.memory.check_invariants()
    assert llm.engine.memory.num_kv_pages == 0


def test_register_and_unregister_adapters(llm: LLM, assets) -> None:
    _, adapters = assets
    llm.engine.register_adapter("sql2", adapters["sql"])
    same = llm.generate(
        ["SELECT"] * 2, SamplingParams(max_tokens=8, temperature=0.0), adapter=["sql", "sql2"]
    )
    assert same[0].token_ids == same[1].token_ids
    llm.engine.unregister_adapter("sql2")
    with pytest.raises(UnknownAdapterError):
        llm.generate(["SELECT"], adapter="sql2")
    with pytest.raises(AdapterError, match="already registered"):
        llm.engine.register_adapter("sql", adapters["fr"])
    llm.engine.memory.check_invariants()


def test_cpu_threads_are_set_and_a_served_engine_leaves_a_core_to_the_front_end_on_4_or_more(
    assets,
) -> None:
    model = assets[0] / "model"
    before = torch.get_num_threads()
    try:
        LLM(model, device="cpu", cpu_threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    cores = available_cores()
    served = with_serving_threads(build_config(str(model)))
    assert served.model.cpu_threads == (cores - 1 if cores >= 4 else cores)
    chosen = build_config(str(model), cpu_threads=3)
    assert with_serving_threads(chosen) is chosen
    with pytest.raises(ValueError, match="cpu_threads must be >= 1, got 0"):
        build_config(str(model), cpu_threads=0)


def test_offline_generate_queues_every_prompt_unless_a_limit_is_asked(assets) -> None:
    """The server's waiting-queue limit (429s) does not apply to `LLM.generate`, which
    queues all its prompts at once; a limit given to `LLM` is kept (and refuses, whole)."""
    model = assets[0] / "model"
    params = SamplingParams(max_tokens=1, temperature=0.0)
    limited = LLM(model, device="cpu", max_waiting_requests=2)
    with pytest.raises(QueueFullError):
        limited.generate(["a"], SamplingParams(n=3, max_tokens=1))
    assert not limited.engine.has_unfinished_requests()
    assert len(limited.generate(["a", "b"], params)) == 2
    unlimited = LLM(model, device="cpu")
    assert unlimited.engine.config.scheduler.max_waiting_requests > 10**9


def test_an_adapter_folder_refused_when_first_read_refuses_the_whole_call(assets, tmp_path) -> None:
    """`LLM` hears the core as the server does: a folder of the adapter dir that cannot be
    read (known only once the core reads it, while the other prompts step) raises its
    `AdapterError` for the call, as the server answers 400, and withdraws every prompt."""
    root, adapters = assets
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text(
        (adapters["sql"] / "adapter_config.json").read_text()
    )
    (tmp_path / "broken" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "good").symlink_to(adapters["sql"])
    llm = LLM(root / "model", device="cpu", dtype="float32", adapter_dir=tmp_path)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    with pytest.raises(AdapterError, match="broken"):
        llm.generate(["a", "b", "c"], params, adapter=[None, "good", "broken"])
    assert not llm.engine.has_unfinished_requests()
    llm.engine.memory.check_invariants()
    assert llm.engine.memory.num_kv_pages == 0
    again = llm.generate(["b"], params, adapter="good")
    assert len(again[0].token_ids) == 40
