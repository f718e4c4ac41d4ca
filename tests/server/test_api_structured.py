"""Output constraints a hostile client may send (issue 24): each is a 400 naming its field,
with no llguidance parser state in the message, and the server answers a normal request
right after. Before the fix the first killed the server (SIGSEGV) and the others were 500s."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_harness import Assets, Running, start_server

from loraserve.models.tokenizer import Tokenizer
from loraserve.server.limits import RequestLimits
from loraserve.server.prompts import ChatRendering, PromptBuilder
from loraserve.server.protocol import ChatMessage

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
DEFAULTS = RequestLimits()


@pytest.fixture(scope="module")
def running(assets: Assets) -> Iterator[Running]:
    server = start_server(assets)
    yield server
    server.server.stop()


def refused_then_served(http: httpx.Client, extra: dict[str, Any], param: str) -> str:
    """The chat request with `extra` is a 400 naming `param`, its message free of llguidance
    internals; a normal request is answered after. Returns the message."""
    response = http.post("/v1/chat/completions", json={**CHAT, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    message = str(error["message"])
    assert "<state>" not in message and "Parser" not in message and len(message) < 400, message
    normal = http.post("/v1/chat/completions", json=CHAT)
    assert normal.status_code == 200 and normal.json()["usage"]["completion_tokens"] > 0
    return message


def chain(num_rules: int) -> str:
    """The issue's reproducer: Lark rules each referring to the next (3,000 crashed)."""
    rules = "\n".join(f'r{i}: "a" r{i + 1} | "b"' for i in range(num_rules))
    return f'start: r0\n{rules}\nr{num_rules}: "z"'


def test_r1_a_chain_of_3000_lark_rules_is_400_and_the_server_lives(http: httpx.Client) -> None:
    refused_then_served(http, {"guided_grammar": chain(3000)}, "guided_grammar")


def test_a_chain_that_overflows_the_checkers_stack_is_400_not_a_crash(
    http: httpx.Client,
) -> None:
    """Within every size limit (1,000 rules), deep enough to overflow the checking child's
    stack: the child dies, the request is a 400, the next constraint is checked by a new one."""
    message = refused_then_served(http, {"guided_grammar": chain(1000)}, "guided_grammar")
    assert "too large or too deeply nested" in message
    served = http.post("/v1/chat/completions", json={**CHAT, "guided_grammar": chain(50)})
    assert served.status_code == 200, served.text
    assert served.json()["choices"][0]["message"]["content"][:1] in ("a", "b")


UNSATISFIABLE = {
    "self reference": {"guided_json": {"$ref": "#"}},
    "defs that refer to each other": {
        "guided_json": {
            "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
            "$ref": "#/$defs/a",
        }
    },
    "empty regex class": {"guided_regex": r"[^\s\S]"},
    "left recursion without a base": {"guided_grammar": 'start: a\na: a "x"'},
}


@pytest.mark.parametrize("extra", UNSATISFIABLE.values(), ids=UNSATISFIABLE.keys())
def test_a_constraint_that_admits_nothing_is_400(http: httpx.Client, extra: dict[str, Any]) -> None:
    (param,) = extra
    refused_then_served(http, extra, param)


def test_what_llguidance_gives_up_on_within_raised_limits_is_400(assets: Assets) -> None:
    """With the server's limits raised, llguidance's own (lexer states) is a 400 too."""
    limits = RequestLimits(max_guided_choices=10**5, max_tools=10**4, max_grammar_bytes=10**7)
    server = start_server(assets, limits=limits, max_request_body_bytes=4 << 20)
    try:
        with server.server.http() as http:
            # Past llguidance's row limit (2,000 items; why max_guided_choices is 1,024), found
            # at the first mask (400) or only at the second token (the request fails): either
            # way the message is free of parser state, and the server serves the next request.
            for prefix in ("option ", "o"):
                choices = {"guided_choice": [f"{prefix}{i}" for i in range(50_000)]}
                failed = http.post(
                    "/v1/chat/completions", json={**CHAT, **choices, "max_tokens": 4}
                )
                assert failed.status_code in (400, 500), failed.text
                message = failed.json()["error"]["message"]
                assert "<state>" not in message and len(message) < 400, message
                normal = http.post("/v1/chat/completions", json=CHAT)
                assert normal.status_code == 200
    finally:
        server.server.stop()


def test_a_tokenizer_llguidance_cannot_read_makes_constraints_400_not_too_large(
    assets: Assets, tmp_path: Path
) -> None:
    """A tokenizer.json without a decoder (llguidance cannot tell each token's bytes): the
    checking child cannot start, which is said as such (a 400 naming the reason, at once for
    later requests too), not as a constraint "too large"; unconstrained requests are served."""
    model = tmp_path / "model"
    shutil.copytree(assets.model, model)
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["decoder"] = None
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    server = start_server(dataclasses.replace(assets, model=model))
    try:
        with server.server.http() as http:
            for _ in range(2):
                refused = http.post("/v1/chat/completions", json={**CHAT, "guided_choice": ["a"]})
                assert refused.status_code == 400, refused.text
                message = refused.json()["error"]["message"]
                assert "not available for this model" in message and "decoder" in message
            assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
    finally:
        server.server.stop()


def branching(count: int) -> dict[str, Any]:
    """An array of objects, each one of `count` shapes (as a wide set of tools makes)."""
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}}
    shapes = [
        {"type": "object", "properties": {"name": {"const": f"tool_{i}"}, "parameters": parameters}}
        for i in range(count)
    ]
    return {"type": "array", "items": {"anyOf": shapes}}


def tools(count: int) -> list[dict[str, Any]]:
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}}
    return [
        {"type": "function", "function": {"name": f"tool_{i}", "parameters": parameters}}
        for i in range(count)
    ]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {"guided_choice": [str(i) for i in range(DEFAULTS.max_guided_choices + 1)]},
            "guided_choice",
        ),
        ({"guided_regex": "a" * (DEFAULTS.max_grammar_bytes + 1)}, "guided_regex"),
        (
            {"guided_grammar": "start: r0\n" + "\n".join(f'r{i}: "x"' for i in range(1025))},
            "guided_grammar",
        ),
        ({"tools": tools(DEFAULTS.max_tools + 1), "tool_choice": "required"}, "tools"),
        ({"tools": tools(2000), "tool_choice": "required"}, "tools"),
        ({"guided_json": branching(DEFAULTS.max_schema_branches + 1)}, "guided_json"),
        (
            {
                "guided_json": {
                    "type": "array",
                    "items": {"oneOf": [{"const": i} for i in range(430)]},
                }
            },
            "guided_json",
        ),
    ],
    ids=["choices", "bytes", "rules", "tools", "2000 tools", "branches", "430 branches"],
)
def test_constraints_above_the_limits_are_400(
    http: httpx.Client, extra: dict[str, Any], param: str
) -> None:
    message = refused_then_served(http, extra, param)
    assert "this server allows at most" in message


def test_constraints_at_the_limits_are_served(http: httpx.Client) -> None:
    at_limit = [
        {"guided_choice": [str(i) for i in range(DEFAULTS.max_guided_choices)]},
        {"tools": tools(DEFAULTS.max_tools), "tool_choice": "required"},
        {"guided_json": branching(DEFAULTS.max_schema_branches)},
    ]
    for extra in at_limit:
        response = http.post("/v1/chat/completions", json={**CHAT, **extra})
        assert response.status_code == 200, response.text


def test_contradictory_filters_are_400(http: httpx.Client, running: Running) -> None:
    assert running.engine.info is not None
    eos = running.engine.info.eos_token_ids[0]
    only_eos = {"allowed_token_ids": [eos], "min_tokens": 2}
    refused_then_served(http, only_eos, "min_tokens")
    json_with_token_0 = {"guided_json": {"type": "object"}, "allowed_token_ids": [0]}
    refused_then_served(http, json_with_token_0, "allowed_token_ids")


def test_a_first_token_the_filters_leave_is_served(http: httpx.Client) -> None:
    """The check refuses only what no token can start: `{` alone is enough for an object."""
    response = http.post("/tokenize", json={"prompt": "{", "add_special_tokens": False})
    (brace,) = response.json()["tokens"]
    extra = {"guided_json": {"type": "object"}, "allowed_token_ids": [brace], "max_tokens": 1}
    answer = http.post("/v1/chat/completions", json={**CHAT, **extra})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "{"


# -- whitespace and schema options ---------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {"guided_json": {"type": "object", "x-guidance": {"whitespace_flexible": True}}},
            "guided_json",
        ),
        (
            {"guided_json": {"type": "object"}, "guided_whitespace_pattern": "[ \\n]*"},
            "guided_json",
        ),
        (
            {"structured_outputs": {"json": {"type": "object"}, "whitespace_pattern": "\\s{0,99}"}},
            "structured_outputs",
        ),
    ],
    ids=["x-guidance", "guided_whitespace_pattern", "structured_outputs.whitespace_pattern"],
)
def test_a_request_cannot_lift_the_whitespace_bound(
    http: httpx.Client, extra: dict[str, Any], param: str
) -> None:
    refused_then_served(http, extra, param)


def test_a_bounded_whitespace_pattern_is_served(http: httpx.Client) -> None:
    extra = {"guided_json": {"type": "object"}, "guided_whitespace_pattern": "[ ]?"}
    assert http.post("/v1/chat/completions", json={**CHAT, **extra}).status_code == 200


# -- agents ----------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def agent_history() -> list[dict[str, Any]]:
    """A conversation as the OpenAI SDK and LangChain send it back: the assistant's parallel
    tool calls with `content: null`, then one `tool` message per call."""
    calls = [
        {
            "id": f"call_{city}",
            "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
        }
        for city in ("Paris", "Oslo")
    ]
    return [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_Paris", "content": "18 C, sunny"},
        {"role": "tool", "tool_call_id": "call_Oslo", "content": "4 C, rain"},
    ]


def test_a_tool_call_round_trip_with_null_content_is_served(http: httpx.Client) -> None:
    body = {"messages": agent_history(), "max_tokens": 4}  # tools: see the test below
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    tokens = http.post("/tokenize", json={"messages": agent_history()}).json()["tokens"]
    prompt = http.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert "18 C, sunny" in prompt and "4 C, rain" in prompt


def test_a_json_schema_format_logs_no_unknown_field(
    http: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    with caplog.at_level(logging.WARNING, logger="loraserve.server.protocol"):
        response = http.post(
            "/v1/chat/completions", json={**CHAT, "response_format": response_format}
        )
    assert response.status_code == 200, response.text
    assert not [record for record in caplog.records if "unknown field" in record.getMessage()]


def test_a_message_without_content_renders_as_an_empty_string() -> None:
    """Templates that concatenate `message['content']` raised on the SDK's `content: null`."""
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    message = ChatMessage.model_validate(
        {"role": "assistant", "content": None, "tool_calls": [call]}
    )
    assert message.template_dict()["content"] == ""
    assert message.template_dict()["tool_calls"] == [call]


# -- fuzzing the grammar path ----------------------------------------------------------------


def fuzz_cases() -> dict[str, dict[str, Any]]:
    """Grammars a hostile client could write: chains, nesting, huge alternations, forms that
    admit nothing, `$ref` cycles, `x-guidance` keys; each within the body limit."""
    nested_schema: dict[str, Any] = {"type": "string"}
    for _ in range(120):
        nested_schema = {"type": "object", "properties": {"a": nested_schema}}
    refs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(600)}
    return {
        "chain 300": {"guided_grammar": chain(300)},
        "chain 900": {"guided_grammar": chain(900)},
        "gbnf chain": {
            "guided_grammar": chain(900).replace(": ", " ::= ").replace("start", "root")
        },
        "parentheses": {"guided_grammar": "start: " + "(" * 2000 + '"a"' + ")" * 2000},
        "regex nesting": {"guided_regex": "(" * 3000 + "a" + ")" * 3000},
        "alternation": {
            "guided_grammar": 'start: "x" (' + "|".join(f'"{i}"' for i in range(5000)) + ")"
        },
        "regex alternation": {"guided_regex": "|".join(f"w{i}" for i in range(5000))},
        "enum": {"guided_json": {"enum": [f"v{i}" for i in range(3000)]}},
        "nested schema": {"guided_json": nested_schema},
        "ref chain": {
            "guided_json": {"$defs": {**refs, "d600": {"type": "string"}}, "$ref": "#/$defs/d0"}
        },
        "ref cycle": {"guided_json": {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}},
        "x-guidance nested": {
            "guided_json": {
                "type": "object",
                "properties": {"a": {"x-guidance": {"lenient": True}}},
            }
        },
        "empty grammar": {"guided_grammar": ""},
        "undefined rule": {"guided_grammar": "start: nothing"},
        "gbnf unsatisfiable": {"guided_grammar": 'root ::= a\na ::= a "x"'},
        "lark import": {"guided_grammar": "%import common.WORD\nstart: WORD"},
        "bad regex": {"guided_regex": "a{99999999}"},
        "choice of empties": {"guided_choice": ["", ""]},
    }


@pytest.mark.parametrize("extra", fuzz_cases().values(), ids=fuzz_cases().keys())
def test_the_grammar_fuzzer_finds_no_5xx_and_the_server_lives(
    http: httpx.Client, extra: dict[str, Any]
) -> None:
    response = http.post("/v1/chat/completions", json={**CHAT, **extra})
    assert response.status_code < 500, response.text[:2000]
    if response.status_code >= 400:
        message = response.json()["error"]["message"]
        assert "<state>" not in message and len(message) < 400, message
    normal = http.post("/v1/chat/completions", json=CHAT)
    assert normal.status_code == 200, normal.text


def test_tools_are_described_to_a_template_that_never_shows_them(assets: Assets) -> None:
    """The test model's template has no tools section: the tools reach the model in the
    system message, in the `<tool_call>` words the hermes parser reads."""
    builder = PromptBuilder(Tokenizer.from_folder(assets.model), 4096)
    history = [{"role": "system", "content": "Be brief."}, *agent_history()]
    text = builder.render(history, ChatRendering(tools=[WEATHER], describe_tools=True))
    assert "Be brief." in text and "<tools>" in text and '"get_weather"' in text
    assert text.count("<|system|>") == 1
    assert "<tools>" not in builder.render(history, ChatRendering())
    assert "<tools>" not in builder.render(history, ChatRendering(tools=[WEATHER]))
    own = ChatRendering(tools=[WEATHER], template="{{ tools | length }}", describe_tools=True)
    assert builder.render(history, own) == "1"  # a template that shows tools is left alone
