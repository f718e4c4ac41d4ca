"""Generation through the real server with the official `openai` client: completions and
chat, streaming and not, several adapters at once; every greedy answer's tokens equal
the `LLM` class's for the same adapter and prompt."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from server_harness import ADAPTERS, Assets, Running

from loraserve import LLM, SamplingParams

MAX_TOKENS = 24
PROMPTS = {
    None: "hello world, this is",
    "attn8": "SELECT name FROM users",
    "mlp4": "Bonjour le monde",
    "all6": "The quick brown fox",
}
TOKEN_IDS = {"logprobs": 0, "extra_body": {"return_tokens_as_token_ids": True}}


@dataclass(frozen=True)
class Answer:
    text: str
    token_ids: list[int]


@pytest.fixture(scope="module")
def reference(assets: Assets) -> dict[tuple[str, str | None], Answer]:
    """The LLM class's greedy answers: ("completion" | "chat", adapter) -> Answer."""
    llm = LLM(assets.model, adapters=assets.adapters, device="cpu")
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    adapters = list(PROMPTS)
    completions = llm.generate(list(PROMPTS.values()), params, adapter=adapters)
    tokenizer = llm.tokenizer
    chat_ids = [
        tokenizer.encode(tokenizer.apply_chat_template(_messages(p)), add_special_tokens=False)
        for p in PROMPTS.values()
    ]
    chats = llm.generate(sampling_params=params, adapter=adapters, prompt_token_ids=chat_ids)
    answers = {}
    for kind, outputs in (("completion", completions), ("chat", chats)):
        for adapter, output in zip(adapters, outputs, strict=True):
            answers[(kind, adapter)] = Answer(output.text, output.token_ids)
    return answers


def _messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": prompt}]


def _ids(tokens: list[str]) -> list[int]:
    return [int(token.removeprefix("token_id:")) for token in tokens]


def complete(client: openai.OpenAI, model: str, prompt: Any, stream: bool) -> Answer:
    """A greedy completion's text and token ids (named by id in its logprobs)."""
    common = dict(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, **TOKEN_IDS)
    if not stream:
        choice = client.completions.create(**common).choices[0]  # type: ignore[call-overload]
        return Answer(choice.text, _ids(choice.logprobs.tokens))
    text, tokens = "", []
    for chunk in client.completions.create(stream=True, **common):  # type: ignore[call-overload]
        text += chunk.choices[0].text
        tokens += chunk.choices[0].logprobs.tokens
    return Answer(text, _ids(tokens))


def chat(client: openai.OpenAI, model: str, prompt: str, stream: bool) -> Answer:
    """A greedy chat answer's text and token ids."""
    common: dict[str, Any] = dict(
        model=model,
        messages=_messages(prompt),
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=True,
        extra_body={"return_tokens_as_token_ids": True},
    )
    if not stream:
        choice = client.chat.completions.create(**common).choices[0]
        return Answer(
            choice.message.content or "", _ids([t.token for t in choice.logprobs.content])
        )
    text, tokens = "", []
    for chunk in client.chat.completions.create(stream=True, **common):
        delta = chunk.choices[0]
        text += delta.delta.content or ""
        tokens += [t.token for t in (delta.logprobs.content if delta.logprobs else [])]
    return Answer(text, _ids(tokens))


def test_models_lists_the_base_model_and_every_adapter_with_its_parent(running: Running) -> None:
    models = {m.id: m for m in running.server.client().models.list().data}
    base = running.engine.info.served_model_name
    assert set(models) == {base, *ADAPTERS}
    assert getattr(models[base], "parent", None) is None
    assert all(getattr(models[name], "parent", None) == base for name in ADAPTERS)


def test_concurrent_adapters_streaming_and_not_match_llm(running: Running, reference) -> None:
    """16 requests at once: every adapter and the base model, completion and chat,
    streaming and not; each must equal the LLM class's answer for its adapter."""
    client = running.server.client()
    base = running.engine.info.served_model_name
    jobs = [
        (kind, adapter, stream)
        for kind in ("completion", "chat")
        for adapter in PROMPTS
        for stream in (False, True)
    ]

    def run(job: tuple[str, str | None, bool]) -> Answer:
        kind, adapter, stream = job
        ask = complete if kind == "completion" else chat
        return ask(client, adapter or base, PROMPTS[adapter], stream)

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(run, jobs))
    for (kind, adapter, stream), answer in zip(jobs, answers, strict=True):
        expected = reference[(kind, adapter)]
        assert answer.token_ids == expected.token_ids, (kind, adapter, stream)
        assert answer.text == expected.text, (kind, adapter, stream)


def test_adapters_change_the_answer(reference) -> None:
    """Guards the test above against adapters that would not matter."""
    answers = [tuple(reference[("completion", a)].token_ids) for a in PROMPTS]
    assert len(set(answers)) == len(answers)


def test_usage_counts_prompt_and_generated_tokens(running: Running, reference) -> None:
    client = running.server.client()
    response = client.completions.create(
        model="attn8", prompt=PROMPTS["attn8"], max_tokens=MAX_TOKENS, temperature=0
    )
    tokenizer = running.engine.tokenizer
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(tokenizer.encode(PROMPTS["attn8"]))
    assert response.usage.completion_tokens == len(reference[("completion", "attn8")].token_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + MAX_TOKENS


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_stream_include_usage_ends_with_a_usage_chunk(running: Running, kind: str) -> None:
    client = running.server.client()
    common: dict[str, Any] = dict(
        model="mlp4",
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    if kind == "completion":
        chunks = list(client.completions.create(prompt="hello", **common))
    else:
        chunks = list(client.chat.completions.create(messages=_messages("hello"), **common))
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    assert all(chunk.choices for chunk in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"


def test_max_completion_tokens_wins_over_max_tokens(running: Running) -> None:
    response = running.server.client().chat.completions.create(
        model="attn8",
        messages=_messages("hello"),
        max_tokens=9,
        max_completion_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert response.usage is not None and response.usage.completion_tokens == 5
    assert response.choices[0].finish_reason == "length"


def test_prompt_lists_and_token_ids_give_one_choice_each(running: Running, reference) -> None:
    client = running.server.client()
    tokenizer = running.engine.tokenizer
    prompts = [PROMPTS["attn8"], tokenizer.encode(PROMPTS["attn8"])]
    for prompt in (prompts[0], prompts[1]):
        assert complete(client, "attn8", prompt, False) == reference[("completion", "attn8")]
    response = client.completions.create(
        model="attn8",
        prompt=[PROMPTS["attn8"], PROMPTS["mlp4"]],
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert [c.index for c in response.choices] == [0, 1]
    assert response.choices[0].text == reference[("completion", "attn8")].text


def test_n_with_a_seed_is_reproducible_and_equals_llm(running: Running, assets: Assets) -> None:
    client = running.server.client()
    params = dict(n=2, temperature=1.0, top_p=0.9, seed=11, max_tokens=12)
    first = client.completions.create(model="all6", prompt="hello", **TOKEN_IDS, **params)
    again = client.completions.create(model="all6", prompt="hello", **TOKEN_IDS, **params)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    llm = LLM(assets.model, adapters=assets.adapters, device="cpu")
    expected = llm.generate("hello", SamplingParams(**params), adapter="all6")[0]
    got = [_ids(choice.logprobs.tokens) for choice in first.choices]
    assert got == [completion.token_ids for completion in expected.outputs]


def test_stop_string_cuts_the_text(running: Running, reference) -> None:
    full = reference[("completion", "mlp4")].text
    stop = full[6:9]
    response = running.server.client().completions.create(
        model="mlp4", prompt=PROMPTS["mlp4"], max_tokens=MAX_TOKENS, temperature=0, stop=[stop]
    )
    assert response.choices[0].text == full[: full.index(stop)]
    assert response.choices[0].finish_reason == "stop"


def test_chat_top_logprobs_are_sorted_and_contain_the_greedy_token(running: Running) -> None:
    response = running.server.client().chat.completions.create(
        model="attn8",
        messages=_messages("hello"),
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = response.choices[0].logprobs.content  # type: ignore[union-attr]
    assert len(content) == 6
    for token in content:
        values = [alternative.logprob for alternative in token.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert token.logprob == pytest.approx(values[0])  # greedy: the most likely
        assert bytes(token.bytes or []).decode(errors="replace") == token.token
