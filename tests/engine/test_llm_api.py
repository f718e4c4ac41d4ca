"""vLLM's shapes of the offline API: `lora_request=LoRARequest(name, id, path)`, prompt dicts,
`chat(messages)` rendered as transformers renders it, and the progress bar."""

from __future__ import annotations

import io
import sys

import pytest
from factories import make_adapter, make_model

from loraserve import LLM, LoRARequest, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm-api")
    base = make_model(root / "model", "llama-gqa", seed=7)
    make_adapter(base, root / "sql", seed=1, r=8, lora_alpha=16, target_modules=["q_proj"])
    return root


@pytest.fixture(scope="module")
def llm(assets) -> LLM:
    return LLM(assets / "model", device="cpu", dtype="float32")


def test_lora_request_reads_the_folder_on_first_use_and_matches_a_named_adapter(
    llm: LLM, assets
) -> None:
    lora = LoRARequest("sql-lora", 1, str(assets / "sql"))
    by_request = llm.generate(["SELECT", "hello"], GREEDY, lora_request=[lora, None])
    assert [out.adapter for out in by_request] == ["sql-lora", None]
    named = LLM(assets / "model", adapters={"sql": assets / "sql"}, device="cpu", dtype="float32")
    by_name = named.generate(["SELECT", "hello"], GREEDY, adapter=["sql", None])
    assert [out.token_ids for out in by_request] == [out.token_ids for out in by_name]
    assert by_request[0].token_ids != by_request[1].token_ids  # the adapter did something
    with pytest.raises(ValueError, match="not both"):
        llm.generate(["a"], GREEDY, adapter="sql-lora", lora_request=lora)


def test_prompt_dicts_are_text_or_token_ids(llm: LLM) -> None:
    ids = llm.tokenizer.encode("hello")
    outs = llm.generate(["hello", {"prompt": "hello"}, {"prompt_token_ids": ids}], GREEDY)
    assert outs[0].token_ids == outs[1].token_ids == outs[2].token_ids
    assert [out.prompt for out in outs] == ["hello", "hello", None]
    with pytest.raises(ValueError, match="a prompt is text"):
        llm.generate([{"text": "hello"}], GREEDY)


def test_chat_renders_as_transformers_does(llm: LLM, assets) -> None:
    from transformers import AutoTokenizer

    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
    ]
    expected = AutoTokenizer.from_pretrained(assets / "model").apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    one = llm.chat(conversation, GREEDY)
    assert one[0].prompt_token_ids == list(expected)
    assert (
        one[0].token_ids
        == llm.generate(prompt_token_ids=[expected], sampling_params=GREEDY)[0].token_ids
    )
    two = llm.chat([conversation, conversation[1:]], GREEDY)
    assert two[0].token_ids == one[0].token_ids and len(two) == 2


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_counts_finished_prompts_on_a_terminal(llm: LLM, monkeypatch) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    llm.generate(["a", "b", "c"], GREEDY)
    assert "Processed prompts" in terminal.getvalue() and "3/3" in terminal.getvalue()
    quiet = Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    llm.generate(["a"], GREEDY, use_tqdm=False)
    assert quiet.getvalue() == ""
    off_a_terminal = io.StringIO()
    monkeypatch.setattr(sys, "stderr", off_a_terminal)
    llm.generate(["a"], GREEDY)
    assert off_a_terminal.getvalue() == ""  # logs and pipes get no bar
