"""Structured output and tool calling through real clients, against the real server and the
tiny model: the `openai` SDK's `chat.completions.parse()` with a pydantic model,
LangChain's `with_structured_output` (json_schema and function calling) and `bind_tools`
round trip, streamed tool calls. A tiny random model writes garbage inside the grammar;
the grammar makes it valid, for every adapter of a concurrent (mixed) batch."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import jsonschema
import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field
from server_harness import ADAPTERS, Running

MODELS = [None, *ADAPTERS]  # None: the base model (model omitted)
MAX_TOKENS = 400  # room for the blanks a random model puts between JSON tokens


class Pet(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=30)
    kind: Literal["cat", "dog"]


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "celsius": {"type": "boolean"},
            },
            "required": ["city", "celsius"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
PARAMETERS = {spec["function"]["name"]: spec["function"]["parameters"] for spec in (WEATHER, TIME)}
MESSAGES = [{"role": "user", "content": "hello world"}]


def model_name(running: Running, model: str | None) -> str:
    return model or running.app.state.served.base_model


def test_sdk_parse_with_a_pydantic_model_for_every_adapter_at_once(running: Running) -> None:
    client = running.server.client()

    def parse(model: str | None):
        completion = client.chat.completions.parse(
            model=model_name(running, model),
            messages=MESSAGES,  # type: ignore[arg-type]
            response_format=Pet,
            max_tokens=MAX_TOKENS,
            seed=len(model or ""),
        )
        return completion.choices[0]

    with ThreadPoolExecutor(len(MODELS) * 2) as pool:  # one mixed batch in the engine
        choices = list(pool.map(parse, MODELS * 2))
    for choice in choices:
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Pet)
        assert choice.message.refusal is None


def test_structured_output_fields_of_vllm_and_completions(running: Running) -> None:
    client = running.server.client()
    schema = {**Pet.model_json_schema(), "additionalProperties": False}  # bounded output
    cases: list[tuple[dict[str, Any], Callable[[str, str], object]]] = [
        ({"guided_json": schema}, lambda text, _: Pet.model_validate_json(text)),
        (
            {"guided_regex": "[a-c]{2,4}-[0-9]"},
            lambda text, _: re.fullmatch("[a-c]{2,4}-[0-9]", text),
        ),
        ({"guided_choice": ["yes", "no", "maybe"]}, lambda text, _: text in ("yes", "no", "maybe")),
        ({"structured_outputs": {"json": schema}}, lambda text, _: Pet.model_validate_json(text)),
        # Any object may nest past max_tokens: only a finished one must parse.
        (
            {"response_format": {"type": "json_object"}},
            lambda text, reason: reason == "length" or isinstance(json.loads(text), dict),
        ),
    ]
    for extra, check in cases:
        for model in MODELS:
            response = client.completions.create(
                model=model_name(running, model),
                prompt="hello world",
                max_tokens=MAX_TOKENS,
                extra_body=extra,
            )
            choice = response.choices[0]
            assert check(choice.text, choice.finish_reason), (extra, choice.text)


def test_tool_choice_required_and_named_give_valid_calls(running: Running) -> None:
    client = running.server.client()
    for model in MODELS:
        common = dict(
            model=model_name(running, model),
            messages=MESSAGES,
            tools=[WEATHER, TIME],
            max_tokens=MAX_TOKENS,
        )
        # One call at most: a random model could otherwise list calls up to max_tokens.
        required = client.chat.completions.create(  # type: ignore[call-overload]
            tool_choice="required", parallel_tool_calls=False, **common
        ).choices[0]  # type: ignore[call-overload]
        assert required.finish_reason == "tool_calls"
        assert required.message.tool_calls
        for call in required.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])
            assert call.id.startswith("call_") and call.type == "function"
        named = client.chat.completions.create(  # type: ignore[call-overload]
            tool_choice={"type": "function", "function": {"name": "get_weather"}}, **common
        ).choices[0]
        assert named.finish_reason == "stop"
        (call,) = named.message.tool_calls
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS["get_weather"])


def test_streamed_tool_calls_add_up_to_valid_calls(running: Running) -> None:
    client = running.server.client()
    stream = client.chat.completions.create(
        model="attn8",
        messages=MESSAGES,  # type: ignore[arg-type]
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=MAX_TOKENS,
        stream=True,
    )
    calls: dict[int, dict[str, str]] = {}
    finish_reasons, pieces = [], 0
    for chunk in stream:
        for choice in chunk.choices:
            finish_reasons.append(choice.finish_reason)
            for delta in choice.delta.tool_calls or []:
                pieces += 1
                entry = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                if delta.id:
                    assert not entry["id"], "a call is named once"
                    entry["id"], entry["name"] = delta.id, delta.function.name  # type: ignore[union-attr]
                entry["arguments"] += delta.function.arguments or ""  # type: ignore[union-attr]
    assert list(calls) == [0]
    # Named once, then the arguments. How many pieces they come in depends on timing: a
    # client slower than the engine gets one event for several steps (merge_deltas), and on
    # a loaded machine that can be all of them. tests/server/test_tools.py checks that the
    # arguments stream as written, token by token.
    assert pieces >= 2
    assert finish_reasons[-1] == "tool_calls"
    jsonschema.validate(json.loads(calls[0]["arguments"]), PARAMETERS[calls[0]["name"]])


def langchain_model(running: Running, model: str) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=f"{running.server.url}/v1",
        api_key="unused",  # type: ignore[arg-type]
        model=model,
        max_retries=0,
        max_completion_tokens=MAX_TOKENS,
    )


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(running: Running, method: str) -> None:
    for model in ADAPTERS:
        # strict: no properties beyond Pet's, else a random model may add some until max_tokens
        structured = langchain_model(running, model).with_structured_output(
            Pet, method=method, strict=True
        )
        pet = structured.invoke("name a pet")
        assert isinstance(pet, Pet)


class WeatherQuery(BaseModel):
    city: str = Field(max_length=10)  # bounded: a random model's string ends
    celsius: bool


@tool(args_schema=WeatherQuery)
def get_weather(city: str, celsius: bool) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


def test_langchain_bind_tools_round_trip(running: Running) -> None:
    llm = langchain_model(running, "mlp4")
    with_tools = llm.bind_tools(  # "any" is OpenAI's "required"
        [get_weather], tool_choice="any", strict=True, parallel_tool_calls=False
    )
    question = HumanMessage("what is the weather in Paris?")
    asked = with_tools.invoke([question])
    assert asked.tool_calls
    call = asked.tool_calls[0]
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "celsius"}
    result = ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])
    answer = llm.invoke([question, asked, result])  # the history holds the call and its result
    assert isinstance(answer.content, str) and answer.response_metadata["finish_reason"]
