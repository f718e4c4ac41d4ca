"""Structured output and tools on the real demo, as an agent developer meets them: the
France question answered as JSON by every model (a random-weight adapter included) within
60 tokens; the `openai` SDK's `chat.completions.parse` + tools loop and LangChain's
`bind_tools` + `ToolMessage` round trip, over the demo's default tool-call parser."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
from demo_harness import DemoServer
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from loraserve.demo.assets import BASE_MODEL_NAME

pytestmark = pytest.mark.slow

FRANCE = [{"role": "user", "content": "What is the capital of France? Reply in JSON."}]
CAPITAL = {
    "type": "object",
    "properties": {"capital": {"type": "string"}},
    "required": ["capital"],
    "additionalProperties": False,
}


class Weather(BaseModel):
    """The weather in a city."""

    city: str


def test_the_france_question_parses_as_json_within_60_tokens_for_every_model(
    demo: DemoServer,
) -> None:
    """OpenAI's strict json_schema: the server's whitespace bound lets even a random-weight
    adapter (which takes every blank the grammar allows) close the object in time."""
    schema = {"name": "answer", "schema": CAPITAL, "strict": True}

    def ask(model: str) -> Any:
        return demo.client.chat.completions.create(
            model=model,
            messages=FRANCE,  # type: ignore[arg-type]
            max_tokens=60,
            temperature=0,  # greedy: a sampled call may write a string past 60 tokens
            response_format={"type": "json_schema", "json_schema": schema},  # type: ignore[typeddict-item]
        )

    with ThreadPoolExecutor(len(demo.models)) as pool:
        answers = dict(zip(demo.models, pool.map(ask, demo.models), strict=True))
    for model, answer in answers.items():
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", (model, choice.message.content)
        assert set(json.loads(choice.message.content or "")) == {"capital"}, model


def test_the_sdk_parse_and_tools_loop(demo: DemoServer) -> None:
    """The SDK's agent loop: a required call parsed into the pydantic model, the assistant's
    message sent back as the SDK gives it (`content: null`, `tool_calls`), the tool's result
    as a `tool` message, then an answer."""
    tools = [openai.pydantic_function_tool(Weather, name="get_weather")]
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    for model in (BASE_MODEL_NAME, "pirate", "json"):  # a random adapter writes strings forever
        asked = demo.client.chat.completions.parse(
            model=model,
            messages=messages,
            tools=tools,
            tool_choice="required",
            max_tokens=60,
            temperature=0,  # greedy: a sampled call may write a string past 60 tokens
        )
        message = asked.choices[0].message
        assert message.tool_calls, model
        call = message.tool_calls[0]
        assert isinstance(call.function.parsed_arguments, Weather), model
        history = [
            *messages,
            message,  # as the SDK's docs do: the message object itself
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C."},
        ]
        answer = demo.client.chat.completions.create(
            model=model, messages=history, tools=tools, max_tokens=40, temperature=0
        )
        assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls"), model
        if model == BASE_MODEL_NAME:  # the instruct model reads the result and reports it
            assert "21" in (answer.choices[0].message.content or "")


@tool(args_schema=Weather)
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"Sunny in {city}, 21 C."


def test_langchain_bind_tools_round_trip(demo: DemoServer) -> None:
    """LangChain's default `bind_tools` (no strict, tool_choice left to the model) reaches a
    server with a parser; forced (`any`), the call comes back, its result goes in as a
    `ToolMessage`, and the model answers."""
    llm = ChatOpenAI(
        model="json", base_url=f"{demo.url}/v1", api_key="unused", temperature=0, max_tokens=60
    )
    question = HumanMessage("What is the weather in Paris?")
    free = llm.bind_tools([get_weather]).invoke([question])
    assert free.response_metadata["finish_reason"] in ("stop", "tool_calls", "length")
    asked = llm.bind_tools([get_weather], tool_choice="any").invoke([question])
    assert asked.tool_calls and asked.tool_calls[0]["name"] == "get_weather"
    call = asked.tool_calls[0]
    result = ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])
    answer = llm.invoke([question, asked, result])
    assert isinstance(answer.content, str) and answer.content
