"""OpenAI's response shapes (and vLLM's extras), as pydantic models.

They follow the components of OpenAI's OpenAPI document (CreateCompletionResponse,
CreateChatCompletionResponse, CreateChatCompletionStreamResponse, Model, ...);
tests/server/openai_schemas.py holds those components and checks responses against
them. `dump()` sends a field that is None only if OpenAI requires it (`REQUIRED`: a
choice's `finish_reason` and `logprobs`, a message's `content` and `refusal`); other
None fields are left out, as OpenAI and vLLM leave them out (a chunk's `delta.role`
after the first, `usage` when not asked for, vLLM's extras nobody asked for).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field


class Response(BaseModel):
    REQUIRED: ClassVar[frozenset[str]] = frozenset()
    """Fields sent even when None (null)."""

    def dump(self) -> dict[str, Any]:
        """The JSON object to send."""
        return _plain(self)  # type: ignore[no-any-return]


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        required: frozenset[str] = getattr(value, "REQUIRED", frozenset())
        return {
            name: _plain(item)
            for name in type(value).model_fields
            if (item := getattr(value, name)) is not None or name in required
        }
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


class Usage(Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class TokenLogprobEntry(Response):
    """vLLM's prompt_logprobs entry (one per alternative, keyed by token id)."""

    logprob: float
    rank: int
    decoded_token: str


PromptLogprobs = list[dict[str, TokenLogprobEntry] | None]
"""vLLM's `prompt_logprobs`: per prompt token (null for the first), its logprob and the
top alternatives', keyed by token id."""


class CompletionLogprobs(Response):
    """The legacy completions format: parallel lists, one entry per token (null for the
    first token of an echoed prompt, which nothing predicts, as OpenAI sent it)."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(Response):
    REQUIRED = frozenset({"logprobs", "finish_reason"})

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class CompletionResponse(Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChunk(CompletionResponse):
    """A streamed piece of a completion (OpenAI streams `text_completion` objects)."""


class TopLogprob(Response):
    REQUIRED = frozenset({"bytes"})

    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(Response):
    REQUIRED = frozenset({"content", "refusal"})

    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class FunctionCall(Response):
    name: str
    arguments: str
    """The arguments, as JSON text."""


class ToolCall(Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(Response):
    REQUIRED = frozenset({"content", "refusal"})

    role: Literal["assistant"] = "assistant"
    content: str | None = ""
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(Response):
    REQUIRED = frozenset({"logprobs", "finish_reason"})

    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None


class ToolCallFunctionDelta(Response):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(Response):
    """A piece of a streamed tool call: the first names it (id, type, function name), the
    next carry more of its arguments' JSON text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ToolCallFunctionDelta


class Delta(Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(Response):
    REQUIRED = frozenset({"logprobs", "finish_reason"})

    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None


class ModelCard(Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "loraserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]
