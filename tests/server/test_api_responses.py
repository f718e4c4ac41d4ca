"""OpenAI's Responses API with the real SDK (`client.responses.create`), and SageMaker's
/invocations: the same answers as the chat (or completions) route gives the same request,
in the shapes the SDK reads; what is not served is a 400 naming the field."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import Response
from server_harness import Assets, Running, start_server

from loraserve.server.auth import Tenants


def chat_answer(running: Running, model: str, messages: list[dict[str, Any]], max_tokens: int):
    return running.server.client().chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,  # type: ignore[arg-type]
    )


def test_responses_create_answers_as_the_chat_route_does(running: Running) -> None:
    base = running.app.state.served.base_model
    client = running.server.client()
    response = client.responses.create(
        model=base, instructions="Be brief.", input="Say hi", max_output_tokens=4, temperature=0
    )
    chat = chat_answer(
        running,
        base,
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}],
        4,
    )
    assert response.object == "response" and response.model == base
    assert response.output_text == chat.choices[0].message.content
    assert response.usage is not None and chat.usage is not None
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    cut = chat.choices[0].finish_reason == "length"
    assert response.status == ("incomplete" if cut else "completed")
    if cut:
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens"
    assert response.instructions == "Be brief." and response.max_output_tokens == 4


def test_responses_input_as_messages_and_an_adapter(running: Running) -> None:
    """A message list (developer taken as system, content parts joined), on an adapter."""
    items: Any = [
        {"role": "developer", "content": "Answer in one word."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]},
        {"role": "user", "content": "Again"},
    ]
    response = running.server.client().responses.create(
        model="attn8", input=items, max_output_tokens=3, temperature=0
    )
    chat = chat_answer(
        running,
        "attn8",
        [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Again"},
        ],
        3,
    )
    assert response.model == "attn8"
    assert response.output_text == chat.choices[0].message.content
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant"


def test_the_response_object_has_the_shape_the_sdk_declares(running: Running) -> None:
    """Validated (not merely constructed) against the SDK's own `Response` model."""
    with running.server.http() as http:
        body = {"input": "hello", "max_output_tokens": 2, "metadata": {"k": "v"}}
        answer = http.post("/v1/responses", json=body)
    assert answer.status_code == 200, answer.text
    response = Response.model_validate(answer.json())
    assert response.metadata == {"k": "v"} and response.tools == []
    assert response.id.startswith("resp_") and response.output[0].id.startswith("msg_")


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"input": "hi", "max_output_tokens": 0}, 400, "max_output_tokens"),
        ({"input": "hi", "temperature": -1}, 400, "temperature"),
        ({"input": []}, 400, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, 400, "input"),
        ({"input": "hi", "stream": "yes"}, 400, "stream"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, 400, "tools"),
        ({"input": "hi", "previous_response_id": "resp_1"}, 400, "previous_response_id"),
        ({"input": "hi", "text": {"format": {"type": "json_object"}}}, 400, "text"),
        ({"input": "hi", "model": "no-such-model"}, 404, "model"),
        ({"instructions": "no input"}, 400, "input"),
    ],
)
def test_what_responses_cannot_serve_is_an_error_naming_the_field(
    running: Running, body: dict[str, Any], status: int, param: str
) -> None:
    with running.server.http() as http:
        answer = http.post("/v1/responses", json=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["message"], error


def test_responses_stream_as_the_sdk_reads_them(running: Running) -> None:
    """`stream=True`: the events in order, the deltas adding up to the text the same request
    gets unstreamed, and `responses.stream()` (the SDK's accumulator) agreeing. (Its
    `get_final_response()` wants `response.completed`; a response cut by max_output_tokens
    ends with `response.incomplete`, as OpenAI's do.)"""
    client = running.server.client()
    base = running.app.state.served.base_model
    options: Any = dict(model=base, input="Say hi", instructions="Be brief.", max_output_tokens=5)
    whole = client.responses.create(**options, temperature=0)
    events = list(client.responses.create(**options, temperature=0, stream=True))
    kinds = [event.type for event in events]
    final = "response.incomplete" if whole.status == "incomplete" else "response.completed"
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        final,
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert "".join(deltas) == whole.output_text and deltas
    done = events[-1].response  # type: ignore[union-attr]
    assert done.output_text == whole.output_text and done.usage == whole.usage
    with client.responses.stream(**options, temperature=0) as stream:  # its text snapshots
        snapshots = [
            event.snapshot for event in stream if event.type == "response.output_text.delta"
        ]
    assert snapshots[-1] == whole.output_text


def test_responses_errors_reach_the_sdk_as_its_exceptions(running: Running) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        running.server.client().responses.create(input="hi", max_output_tokens=0)
    assert "max_output_tokens" in str(caught.value)


def test_invocations_routes_chat_and_completion_bodies(running: Running) -> None:
    base = running.app.state.served.base_model
    messages = [{"role": "user", "content": "hi"}]
    with running.server.http() as http:
        chat = http.post(
            "/invocations",
            json={"model": base, "messages": messages, "max_tokens": 3, "temperature": 0},
        )
        completion = http.post(
            "/invocations", json={"model": "mlp4", "prompt": "hi", "max_tokens": 3}
        )
    assert chat.status_code == 200 and chat.json()["object"] == "chat.completion"
    expected = chat_answer(running, base, messages, 3).choices[0].message.content
    assert chat.json()["choices"][0]["message"]["content"] == expected
    assert completion.status_code == 200 and completion.json()["object"] == "text_completion"
    assert completion.json()["model"] == "mlp4"


@pytest.mark.parametrize(
    "content, status, param",
    [
        (b'{"max_tokens": 3}', 400, "messages"),
        (b"[1, 2]", 400, "messages"),
        (b'{"messages": "not a list"}', 400, "messages"),
        (b'{"prompt": "hi", "max_tokens": -1}', 400, "max_tokens"),
        (b'{"prompt": "hi", "model": "nope"}', 404, "model"),
        (b'{"prompt": ', 400, None),
    ],
)
def test_invocations_refuses_what_neither_route_takes(
    running: Running, content: bytes, status: int, param: str | None
) -> None:
    with running.server.http() as http:
        answer = http.post(
            "/invocations", content=content, headers={"Content-Type": "application/json"}
        )
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["param"] == param


def test_invocations_streams_as_the_chat_route(running: Running) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
    with running.server.http() as http, http.stream("POST", "/invocations", json=body) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in answer.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_invocations_needs_a_key_when_keys_are_set(assets: Assets) -> None:
    tenants = Tenants.from_options(None, "sk-one")
    server = start_server(assets, tenants=tenants)
    try:
        body = {"prompt": "hi", "max_tokens": 1}
        assert httpx.post(f"{server.server.url}/invocations", json=body).status_code == 401
        keyed = httpx.post(
            f"{server.server.url}/invocations",
            json=body,
            headers={"Authorization": "Bearer sk-one"},
        )
        assert keyed.status_code == 200, keyed.text
    finally:
        server.server.stop()
