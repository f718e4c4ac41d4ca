"""Every kind of response, checked against OpenAI's published response components
(tests/server/openai_schemas.py): completions and chat, whole and streamed, with
logprobs, echo, tool calls and usage; the model list and one model; an error."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from openai_schemas import (
    CreateChatCompletionResponse,
    CreateChatCompletionStreamResponse,
    CreateCompletionResponse,
    ErrorResponse,
    ListModelsResponse,
    Model,
)
from server_harness import Running

CHAT = {"model": "attn8", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
TOOL = {
    "type": "function",
    "function": {
        "name": "f",
        "parameters": {
            "type": "object",
            "properties": {"a": {"enum": [1, 2]}},
            "required": ["a"],
            "additionalProperties": False,
        },
    },
}
COMPLETION = {"model": "mlp4", "prompt": "hello", "max_tokens": 6}


def events(text: str) -> list[dict[str, Any]]:
    lines = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"logprobs": True, "top_logprobs": 2, "n": 2, "temperature": 1},
        {"tools": [TOOL], "tool_choice": "required"},
        {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "f"}}},
    ],
)
def test_chat_responses_match_openai(running: Running, extra: dict[str, Any]) -> None:
    with running.server.http() as http:
        whole = http.post("/v1/chat/completions", json={**CHAT, **extra, "max_tokens": 40})
        jsonschema.validate(whole.json(), CreateChatCompletionResponse)
        stream = {
            **CHAT,
            **extra,
            "max_tokens": 40,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        chunks = events(http.post("/v1/chat/completions", json=stream).text)
    for chunk in chunks:
        jsonschema.validate(chunk, CreateChatCompletionStreamResponse)
    seen: set[int] = set()
    for chunk in chunks:
        for choice in chunk["choices"]:  # the role in each choice's first delta only
            assert ("role" in choice["delta"]) == (choice["index"] not in seen)
            seen.add(choice["index"])
    assert chunks[-1]["usage"]["total_tokens"] > 0 and chunks[-1]["choices"] == []


@pytest.mark.parametrize(
    "extra", [{}, {"logprobs": 2}, {"echo": True, "logprobs": 1}, {"n": 2, "temperature": 1}]
)
def test_completion_responses_match_openai(running: Running, extra: dict[str, Any]) -> None:
    with running.server.http() as http:
        whole = http.post("/v1/completions", json={**COMPLETION, **extra})
        jsonschema.validate(whole.json(), CreateCompletionResponse)
        chunks = events(
            http.post("/v1/completions", json={**COMPLETION, **extra, "stream": True}).text
        )
    for chunk in chunks:
        jsonschema.validate(chunk, CreateCompletionResponse)
        assert "usage" not in chunk  # only with stream_options.include_usage


def test_models_and_errors_match_openai(running: Running) -> None:
    with running.server.http() as http:
        jsonschema.validate(http.get("/v1/models").json(), ListModelsResponse)
        jsonschema.validate(http.get("/v1/models/attn8").json(), Model)
        jsonschema.validate(http.get("/v1/models/nope").json(), ErrorResponse)
        bad = http.post("/v1/completions", json={**COMPLETION, "max_tokens": -1})
        jsonschema.validate(bad.json(), ErrorResponse)
