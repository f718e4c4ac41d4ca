"""OpenAI's Responses API (`POST /v1/responses`, `client.responses.create(...)`), text only,
nothing stored; and SageMaker's `POST /invocations`, routed as vLLM routes it.

A Responses request is a chat completion in other words: `instructions` is a system
message, `input` a string (one user message) or a list of messages (`developer` is taken as
`system`, content a string or `input_text` / `output_text` parts), `max_output_tokens` is
`max_tokens`; `stream: true` streams it (server/responses_stream.py retells the chat
route's chunks as Responses events). It runs through the chat route (same template, limits, tenants, metrics) and
its answer is reshaped into a `response` object: one `message` output item of one
`output_text` part; `status` `completed`, or `incomplete` with `incomplete_details.reason`
`max_output_tokens` when the token limit cut it. What would change the output but is not
served is refused with a 400 naming the field: `tools`, `previous_response_id`
(no response is stored), a `text.format` other than text, other input item types.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError

from loraserve.engine.core.sampling_params import MAX_TEMPERATURE
from loraserve.errors import InvalidRequestError
from loraserve.server.chat import create_chat_completion
from loraserve.server.completions import create_completion
from loraserve.server.errors import APIError
from loraserve.server.protocol import ChatCompletionRequest, CompletionRequest, StrictBody
from loraserve.server.responses_stream import response_events
from loraserve.server.serving import fields_as_sent, served_of, tenant_of
from loraserve.server.sse import EventStreamResponse

Body = TypeVar("Body", bound=BaseModel)
RENAMED = {"max_tokens": "max_output_tokens", "messages": "input"}
"""Chat fields as a Responses request calls them (errors name what the client sent)."""


class InputText(StrictBody):
    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(StrictBody):
    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]

    def chat_message(self) -> dict[str, str]:
        content = self.content
        text = content if isinstance(content, str) else "".join(part.text for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class TextFormat(StrictBody):
    type: Literal["text"]


class TextOptions(StrictBody):
    format: TextFormat | None = None


class ResponsesRequest(StrictBody):
    """POST /v1/responses."""

    model: str | None = None
    input: str | Annotated[list[InputMessage], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=MAX_TEMPERATURE)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stream: bool | None = None
    tools: Annotated[list[Any], Field(max_length=0)] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    previous_response_id: None = None
    text: TextOptions | None = None
    # Accepted, with no effect on the output.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    parallel_tool_calls: bool | None = None
    truncation: Literal["disabled"] | None = None
    reasoning: dict[str, Any] | None = None
    service_tier: str | None = None
    # vLLM's
    cache_salt: str | None = None

    def chat_body(self) -> dict[str, Any]:
        """The chat completion request it amounts to."""
        messages = [] if self.instructions is None else [self.system_message()]
        if isinstance(self.input, str):
            messages.append({"role": "user", "content": self.input})
        else:
            messages += [message.chat_message() for message in self.input]
        body: dict[str, Any] = {"messages": messages, "max_tokens": self.max_output_tokens}
        if self.stream:
            body.update(stream=True, stream_options={"include_usage": True})
        for name in ("model", "temperature", "top_p", "user", "cache_salt"):
            body[name] = getattr(self, name)
        return {name: value for name, value in body.items() if value is not None}

    def system_message(self) -> dict[str, str]:
        return {"role": "system", "content": str(self.instructions)}


def add_compat_routes(app: FastAPI) -> None:
    @app.post("/v1/responses", response_model=None)
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        """OpenAI's Responses API: text in, one text message out (see the module docstring)."""
        with fields_as_sent(RENAMED):
            chat = _validated(ChatCompletionRequest, body.chat_body())
            answer = await create_chat_completion(
                served_of(request), chat, tenant_of(request), request
            )
        if isinstance(answer, EventStreamResponse):
            shape = ResponseShape(body, served_of(request).model_name(body.model))
            events = response_events(shape, answer.body_iterator)  # type: ignore[arg-type]
            return EventStreamResponse(events, answer.streams)
        return JSONResponse(_response_object(body, json.loads(bytes(answer.body))))

    @app.post("/invocations", response_model=None)
    async def invocations(request: Request) -> Response:
        """SageMaker's route, as vLLM answers it: a body with `messages` is a chat
        completion, one with `prompt` a completion; anything else a 400."""
        try:
            body = json.loads(await request.body())
        except ValueError as error:
            message = f"The request body is not valid JSON: {error}"
            raise APIError(400, message, code="invalid_json") from None
        served, tenant = served_of(request), tenant_of(request)
        if isinstance(body, dict) and "messages" in body:
            chat = _validated(ChatCompletionRequest, body)
            return await create_chat_completion(served, chat, tenant, request)
        if isinstance(body, dict) and "prompt" in body:
            completion = _validated(CompletionRequest, body)
            return await create_completion(served, completion, tenant, request)
        raise APIError(
            400,
            "an /invocations body is a chat completion request (with `messages`) or a "
            "completion request (with `prompt`)",
            "messages",
        )


def _validated(kind: type[Body], body: Any) -> Body:
    """`body` as a `kind` request; a 400 naming the first bad field, as the routes give."""
    try:
        return kind.model_validate(body)
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None


def _response_object(request: ResponsesRequest, chat: dict[str, Any]) -> dict[str, Any]:
    """A `response` object from a chat completion of one choice."""
    (choice,) = chat["choices"]
    if choice["finish_reason"] == "error":  # the engine failed this request alone
        raise InvalidRequestError(f"the request failed: {choice['message'].get('content')}")
    shape = ResponseShape(request, chat["model"], chat["created"])
    cut = choice["finish_reason"] == "length"
    message = shape.message(choice["message"]["content"] or "", cut)
    return shape.response("incomplete" if cut else "completed", [message], chat["usage"])


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


@dataclass
class ResponseShape:
    """The `response` object of one request, and its one output message, at any stage."""

    request: ResponsesRequest
    model: str
    created_at: int = field(default_factory=lambda: int(time.time()))
    id: str = field(default_factory=lambda: f"resp_{uuid.uuid4().hex}")
    message_id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")

    def message(self, text: str | None, cut: bool = False) -> dict[str, Any]:
        """The output message: in progress (no text yet), completed, or incomplete (`cut`)."""
        status = "in_progress" if text is None else "incomplete" if cut else "completed"
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": [] if text is None else [output_text(text)],
        }

    def response(
        self, status: str, output: list[dict[str, Any]], usage: dict[str, int] | None
    ) -> dict[str, Any]:
        """The response object; `usage` in chat completions' terms (None while in progress)."""
        request = self.request
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": request.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "temperature": request.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": request.tool_choice or "auto",
            "tools": [],
            "top_p": request.top_p,
            "truncation": "disabled",
            "usage": None if usage is None else _usage(usage),
            "user": request.user,
            "metadata": request.metadata or {},
        }


def _usage(usage: dict[str, int]) -> dict[str, Any]:
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"],
    }
