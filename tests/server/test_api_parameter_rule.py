"""The rule: every field a generation request may carry is honoured or refused with a 400
that names it. This walks the request models (server/protocol.py): each field must have a
case below, which sends it with a value that would change the output and checks that the
output changed as the field says, or that the request was refused naming the field, or
(for the few fields that cannot change the output) that it did not change."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from server_harness import Assets, Running, start_server

from loraserve.server.params import NO_EFFECT
from loraserve.server.protocol import ChatCompletionRequest, CompletionRequest

MODEL = "attn8"
PROMPT = "hello"  # attn8's greedy answer repeats tokens: penalties must change it
TEMPLATE = (  # the test model's template, plus the variables a request can set
    "{{ flavour or '' }}{{ reasoning_effort or '' }}{{ (documents or []) | length }}"
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
GREEDY = {"model": MODEL, "max_tokens": 12, "temperature": 0}
SAMPLED = {"model": MODEL, "max_tokens": 12, "temperature": 1.0, "seed": 7}


@pytest.fixture(scope="module")
def running(assets: Assets) -> Iterator[Running]:
    server = start_server(assets, chat_template=TEMPLATE, trust_request_chat_template=True)
    yield server
    server.server.stop()


class Client:
    """Requests to one endpoint, and the greedy baseline to compare with."""

    def __init__(self, running: Running, path: str, base: dict[str, Any]) -> None:
        self.http = running.server.http()
        self.path, self.base = path, base
        self.running = running
        self.tokenizer = running.engine.tokenizer
        self.baseline = self.ok(GREEDY)

    def send(self, body: dict[str, Any]) -> httpx.Response:
        return self.http.post(self.path, json={**self.base, **body})

    def ok(self, body: dict[str, Any]) -> dict[str, Any]:
        response = self.send(body)
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def refused(self, field: str, body: dict[str, Any]) -> None:
        response = self.send({**GREEDY, **body})
        assert response.status_code == 400, (field, response.text)
        assert response.json()["error"]["param"] == field, response.text

    def ids(self, body: dict[str, Any]) -> list[int]:
        return self.ok({**body, "return_token_ids": True})["choices"][0]["token_ids"]  # type: ignore[no-any-return]


def text(answer: dict[str, Any]) -> str:
    choice = answer["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"] or ""


Case = Callable[[Client], None]


def unchanged(value: Any) -> Callable[[str], Case]:
    def make(field: str) -> Case:
        return lambda c: _same(c, {**GREEDY, field: value})

    return make


def _same(c: Client, body: dict[str, Any]) -> None:
    assert text(c.ok(body)) == text(c.baseline)


def refused(value: Any) -> Callable[[str], Case]:
    def make(field: str) -> Case:
        return lambda c: c.refused(field, {field: value})

    return make


def changes(check: Callable[[Client, str], None]) -> Callable[[str], Case]:
    return lambda field: lambda c: check(c, field)


def _greedy_ids(c: Client) -> list[int]:
    return c.ids(GREEDY)


def _penalty(c: Client, field: str) -> None:
    greedy = _greedy_ids(c)
    assert len(set(greedy)) < len(greedy), "precondition: the greedy answer repeats a token"
    assert c.ids({**GREEDY, field: 2.0}) != greedy


def _stop_token(c: Client, field: str) -> None:
    greedy = _greedy_ids(c)
    answer = c.ok({**GREEDY, field: [greedy[2]], "return_token_ids": True})
    choice = answer["choices"][0]
    assert choice["token_ids"] == greedy[:3] and choice["finish_reason"] == "stop"


def _min_tokens(c: Client, field: str) -> None:
    greedy = _greedy_ids(c)
    ids = c.ids({**GREEDY, "stop_token_ids": [greedy[0]], field: 3})
    assert ids[0] != greedy[0] and len(ids) >= 3


def _eos_bias(c: Client) -> dict[str, float]:
    eos = c.running.engine.info.eos_token_ids[0]  # type: ignore[union-attr]
    return {str(eos): 100.0}


def _ignore_eos(c: Client, field: str) -> None:
    assert len(c.ids({**GREEDY, "logit_bias": _eos_bias(c)})) == 1
    assert len(c.ids({**GREEDY, "logit_bias": _eos_bias(c), field: True})) == 12


def _skip_special(c: Client, field: str) -> None:
    user = c.tokenizer.encode("<|user|>", add_special_tokens=False)[0]
    body = {**GREEDY, "logit_bias": {str(user): 100.0}, "max_tokens": 2}
    assert "<|user|>" not in text(c.ok(body))
    assert "<|user|>" in text(c.ok({**body, field: False}))


def _stop_string(c: Client, field: str) -> None:
    baseline = text(c.baseline)
    stop = baseline[3:5]
    assert stop in baseline and baseline.index(stop) == 3, "precondition"
    assert text(c.ok({**GREEDY, "stop": stop})) == baseline[:3]
    if field == "include_stop_str_in_output":
        assert text(c.ok({**GREEDY, "stop": stop, field: True})) == baseline[:5]


def _bias(c: Client, field: str) -> None:
    greedy = _greedy_ids(c)
    assert c.ids({**GREEDY, field: {str(greedy[0]): -100.0}})[0] != greedy[0]


def _allowed(c: Client, field: str) -> None:
    allowed = [40, 41, 42]
    assert set(c.ids({**GREEDY, field: allowed})) <= set(allowed)


def _bad_words(c: Client, field: str) -> None:
    greedy = _greedy_ids(c)
    word = c.tokenizer.decode([greedy[0]])
    assert c.tokenizer.encode(word, add_special_tokens=False) == [greedy[0]], "precondition"
    assert c.ids({**GREEDY, field: [word]})[0] != greedy[0]


def _sampling_to_greedy(value: Any) -> Callable[[Client, str], None]:
    """A value that leaves only the most likely token: a sampled answer becomes greedy."""

    def check(c: Client, field: str) -> None:
        greedy = _greedy_ids(c)
        assert c.ids(SAMPLED) != greedy, "precondition: sampling differs from greedy"
        assert c.ids({**SAMPLED, field: value}) == greedy

    return check


def _temperature(c: Client, field: str) -> None:
    assert c.ids({**GREEDY, field: 1.5, "seed": 3}) != _greedy_ids(c)


def _seed(c: Client, field: str) -> None:
    first = c.ids({**SAMPLED, field: 11})
    assert c.ids({**SAMPLED, field: 11}) == first
    assert c.ids({**SAMPLED, field: 12}) != first


def _regex(field: str, value: Any, expected: str) -> Callable[[str], Case]:
    return lambda _: lambda c: _expect_text(c, {field: value}, expected)


def _expect_text(c: Client, body: dict[str, Any], expected: str) -> None:
    assert text(c.ok({**GREEDY, "max_tokens": 40, **body})) == expected


def _n(c: Client, field: str) -> None:
    assert len(c.ok({**SAMPLED, field: 2})["choices"]) == 2


def _stream(c: Client, field: str) -> None:
    response = c.send({**GREEDY, field: True})
    assert response.headers["content-type"].startswith("text/event-stream")


def _stream_options(c: Client, field: str) -> None:
    response = c.send({**GREEDY, "stream": True, field: {"include_usage": True}})
    events = [line for line in response.text.splitlines() if line.startswith("data: {")]
    assert '"usage"' in events[-1]
    c.refused(field, {field: {"include_usage": True}})  # without stream


def _model(c: Client, field: str) -> None:
    body = {key: value for key, value in GREEDY.items() if key != field}
    answer = c.ok(body)
    assert answer["model"] == c.running.app.state.served.base_model
    assert text(answer) != text(c.baseline)  # the base model, not attn8


def _prompt_logprobs(c: Client, field: str) -> None:
    answer = c.ok({**GREEDY, field: 1})
    entries = answer.get("prompt_logprobs") or answer["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and len(entries) == answer["usage"]["prompt_tokens"]


def _token_names(c: Client, field: str) -> None:
    body = {**GREEDY, field: True, **_logprobs_on(c)}
    choice = c.ok(body)["choices"][0]
    tokens = (
        choice["logprobs"]["tokens"]
        if "tokens" in choice["logprobs"]
        else [entry["token"] for entry in choice["logprobs"]["content"]]
    )
    assert all(token.startswith("token_id:") for token in tokens)


def _logprobs_on(c: Client) -> dict[str, Any]:
    return {"logprobs": 0} if c.path == "/v1/completions" else {"logprobs": True}


def _return_token_ids(c: Client, field: str) -> None:
    choice = c.ok({**GREEDY, field: True})["choices"][0]
    assert len(choice["token_ids"]) == 12


def _prompt_tokens(
    body: dict[str, Any], compare: Callable[[int, int], bool]
) -> Callable[[Client, str], None]:
    def check(c: Client, field: str) -> None:
        before = c.baseline["usage"]["prompt_tokens"]
        after = c.ok({**GREEDY, **body})["usage"]["prompt_tokens"]
        assert compare(after, before), (field, before, after)

    return check


def _structured(field: str, value: Any, allowed: tuple[str, ...]) -> Callable[[str], Case]:
    def case(c: Client) -> None:
        assert text(c.ok({**GREEDY, "max_tokens": 40, field: value})) in allowed

    return lambda _: case


def _whitespace(c: Client, field: str) -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["a"],
        "additionalProperties": False,
    }
    body = {**GREEDY, "max_tokens": 60, "guided_json": schema}
    assert text(c.ok({**body, field: ""})) in [f'{{"a":{digit}}}' for digit in range(10)]


def _backend(c: Client, field: str) -> None:
    assert text(c.ok({**GREEDY, field: "xgrammar", "guided_choice": ["A", "B"]})) in ("A", "B")
    c.refused(field, {field: "bogus"})


COMMON: dict[str, Callable[[str], Case]] = {
    "model": changes(_model),
    "n": changes(_n),
    "temperature": changes(_temperature),
    "top_p": changes(_sampling_to_greedy(1e-9)),
    "seed": changes(_seed),
    "stop": changes(_stop_string),
    "presence_penalty": changes(_penalty),
    "frequency_penalty": changes(_penalty),
    "logit_bias": changes(_bias),
    "stream": changes(_stream),
    "stream_options": changes(_stream_options),
    "response_format": _structured(
        "response_format",
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["yes", "no"]}}},
        ('"yes"', '"no"'),
    ),
    "top_k": changes(_sampling_to_greedy(1)),
    "min_p": changes(_sampling_to_greedy(1.0)),
    "min_tokens": changes(_min_tokens),
    "ignore_eos": changes(_ignore_eos),
    "repetition_penalty": changes(_penalty),
    "stop_token_ids": changes(_stop_token),
    "include_stop_str_in_output": changes(_stop_string),
    "skip_special_tokens": changes(_skip_special),
    "spaces_between_special_tokens": refused(False),
    "allowed_token_ids": changes(_allowed),
    "bad_words": changes(_bad_words),
    "prompt_logprobs": changes(_prompt_logprobs),
    "return_tokens_as_token_ids": changes(_token_names),
    "return_token_ids": changes(_return_token_ids),
    "truncate_prompt_tokens": changes(
        _prompt_tokens({"truncate_prompt_tokens": 2}, lambda after, _: after == 2)
    ),
    "use_beam_search": refused(True),
    "length_penalty": refused(2.0),
    "early_stopping": refused(True),
    "logits_processors": refused(["my.module:Processor"]),
    "priority": refused(1),
    "kv_transfer_params": refused({"do_remote_decode": True}),
    "vllm_xargs": refused({"key": 1}),
    "structured_outputs": _structured(
        "structured_outputs", {"choice": ["up", "down"]}, ("up", "down")
    ),
    "guided_json": _structured("guided_json", {"enum": [1, 2]}, ("1", "2")),
    "guided_regex": _regex("guided_regex", "z{3}", "zzz"),
    "guided_choice": _structured("guided_choice", ["left", "right"], ("left", "right")),
    "guided_grammar": _regex("guided_grammar", 'root ::= "ok"', "ok"),
    "guided_decoding_backend": changes(_backend),
    "guided_whitespace_pattern": changes(_whitespace),
    **{
        field: unchanged(value)
        for field, value in {
            "user": "someone",
            "metadata": {"a": "b"},
            "store": True,
            "service_tier": "auto",
            "cache_salt": "salt",
            "request_id": "rule-test",
        }.items()
    },
}


def _echo_completion(c: Client, field: str) -> None:
    assert text(c.ok({**GREEDY, field: True})).startswith(PROMPT)


def _max_tokens(c: Client, field: str) -> None:
    assert len(c.ids({**GREEDY, field: 3})) == 3


def _logprobs(c: Client, field: str) -> None:
    assert c.ok({**GREEDY, **_logprobs_on(c)})["choices"][0]["logprobs"] is not None


COMPLETIONS: dict[str, Callable[[str], Case]] = {
    **COMMON,
    "prompt": changes(lambda c, field: _differs(c, {field: "SELECT"})),
    "max_tokens": changes(_max_tokens),
    "logprobs": changes(_logprobs),
    "echo": changes(_echo_completion),
    "best_of": refused(3),
    "suffix": refused("the end"),
    "add_special_tokens": changes(
        _prompt_tokens({"add_special_tokens": False}, lambda after, before: after == before - 1)
    ),
}


def _differs(c: Client, body: dict[str, Any]) -> None:
    assert text(c.ok({**GREEDY, **body})) != text(c.baseline)


def _tool_call(c: Client, field: str) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"enum": [1]}}}
    choice = {"type": "function", "function": {"name": "f"}}
    message = c.ok({**GREEDY, "tools": [tool], "tool_choice": choice})["choices"][0]["message"]
    assert message["tool_calls"][0]["function"] == {"name": "f", "arguments": "1"}
    if field == "tool_choice":
        c.refused(field, {field: "required"})  # without tools


def _parallel(c: Client, field: str) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"enum": [1]}}}
    body = {**GREEDY, "max_tokens": 60, "tools": [tool], "tool_choice": "required", field: False}
    assert len(c.ok(body)["choices"][0]["message"]["tool_calls"]) == 1


def _top_logprobs(c: Client, field: str) -> None:
    logprobs = c.ok({**GREEDY, "logprobs": True, field: 3})["choices"][0]["logprobs"]
    assert len(logprobs["content"][0]["top_logprobs"]) == 3


def _chat_echo(c: Client, field: str) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure: "}]
    answer = c.ok({**GREEDY, "messages": messages, field: True})
    assert text(answer).startswith("Sure: ")


def _continue_final(c: Client, field: str) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}]
    body = {**GREEDY, "messages": messages, "add_generation_prompt": False}
    closed = c.ok(body)["usage"]["prompt_tokens"]
    assert c.ok({**body, field: True})["usage"]["prompt_tokens"] < closed  # no <|end|>


CHAT: dict[str, Callable[[str], Case]] = {
    **COMMON,
    "messages": changes(
        lambda c, field: _differs(c, {field: [{"role": "user", "content": "SELECT"}]})
    ),
    "max_tokens": changes(_max_tokens),
    "max_completion_tokens": changes(_max_tokens),
    "logprobs": changes(_logprobs),
    "top_logprobs": changes(_top_logprobs),
    "tools": changes(_tool_call),
    "tool_choice": changes(_tool_call),
    "parallel_tool_calls": changes(_parallel),
    "functions": refused([{"name": "f"}]),
    "function_call": refused("auto"),
    "modalities": refused(["audio"]),
    "audio": refused({"voice": "alloy"}),
    "prediction": unchanged({"type": "content", "content": "hello"}),
    "reasoning_effort": changes(_prompt_tokens({"reasoning_effort": "high"}, lambda a, b: a > b)),
    "verbosity": refused("low"),
    "web_search_options": refused({}),
    "echo": changes(_chat_echo),
    "add_generation_prompt": changes(
        _prompt_tokens({"add_generation_prompt": False}, lambda after, before: after < before)
    ),
    "continue_final_message": changes(_continue_final),
    "chat_template": changes(_prompt_tokens({"chat_template": "{{ 'x' }}"}, lambda a, b: a < b)),
    "chat_template_kwargs": changes(
        _prompt_tokens({"chat_template_kwargs": {"flavour": "SELECT name"}}, lambda a, b: a > b)
    ),
    "documents": changes(
        _prompt_tokens({"documents": [{"title": "a"}] * 10}, lambda after, before: after > before)
    ),
    "include_reasoning": unchanged(False),  # no reasoning parser: nothing to leave out
    "mm_processor_kwargs": refused({"size": 3}),
    "add_special_tokens": changes(
        _prompt_tokens({"add_special_tokens": True}, lambda after, before: after == before + 1)
    ),
}

ENDPOINTS = {
    "/v1/completions": (CompletionRequest, COMPLETIONS, {"prompt": PROMPT}),
    "/v1/chat/completions": (
        ChatCompletionRequest,
        CHAT,
        {"messages": [{"role": "user", "content": PROMPT}]},
    ),
}


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_every_field_has_a_case(path: str) -> None:
    model, cases, _ = ENDPOINTS[path]
    assert set(model.model_fields) == set(cases)
    every = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
    assert every >= NO_EFFECT


@pytest.mark.parametrize(
    ("path", "field"),
    [(path, field) for path, (model, _, _) in ENDPOINTS.items() for field in model.model_fields],
)
def test_every_field_is_honoured_or_refused(running: Running, path: str, field: str) -> None:
    _, cases, base = ENDPOINTS[path]
    client = Client(running, path, base)
    cases[field](field)(client)
