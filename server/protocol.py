"""OpenAI's request and response shapes (and vLLM's admin bodies), as pydantic models.

Requests validate strictly (a string where a number belongs is a 400, not a
silent conversion). Fields OpenAI defines that loraserve cannot honour are
declared and refused with a message rather than silently ignored; other unknown
fields are ignored, as vLLM does, so clients sending newer fields still work.
vLLM's sampling extras (`top_k`, `min_p`, `ignore_eos`, `repetition_penalty`,
...) are accepted in the body, e.g. through the `openai` client's `extra_body`.

Validation runs on the event loop, so its cost must not grow with what a client can
pack into a body faster than the body's size: a completions `prompt` is validated as
the one form its first element says (a list of a million token ids is read once, not
tried against every form in turn), and a conversation longer than `MAX_MESSAGES` is
refused before its messages are validated. Sizes that depend on the served model or
the server's limits are checked after validation (server/prompts.py, server/limits.py).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
)

from loraserve.engine.sampling_params import (
    MAX_LOGPROBS,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    MIN_REPETITION_PENALTY,
)

MAX_MESSAGES = 4096
"""Most messages in one conversation; validating each costs a few microseconds of the
event loop."""
MAX_ADAPTER_NAME_CHARS = 256
"""Longest adapter name (it is also a model id and a metric label value)."""


class Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(Request):
    include_usage: bool = False


Penalty = Annotated[float, Field(ge=-2, le=2)]
Logprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]
MaxTokens = Annotated[int, Field(ge=1)]


class SamplingFields(Request):
    """Sampling fields common to both endpoints (OpenAI's, then vLLM's extras).

    The ranges are SamplingParams' (engine/sampling_params.py, which says why), stated
    here too so that the OpenAPI schema tells clients (and fuzzers) what is accepted;
    limits on counts are the server's (server/limits.py)."""

    model: str
    n: Annotated[int, Field(ge=1)] = 1
    temperature: Annotated[float, Field(ge=0, le=MAX_TEMPERATURE)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: Annotated[int, Field(ge=-1, le=MAX_TOP_K)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    repetition_penalty: Annotated[float, Field(ge=MIN_REPETITION_PENALTY, le=2)] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    return_tokens_as_token_ids: bool = False
    """Logprobs name tokens `token_id:ID` instead of their text (vLLM's extra)."""


def _prompt_form(value: Any) -> str:
    """Which of OpenAI's four prompt forms `value` is, from its first element."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, list) and value and isinstance(value[0], str):
        return "texts"
    if isinstance(value, list) and value and isinstance(value[0], list):
        return "token_lists"
    return "token_ids"  # an empty list, or anything else: its error names the simplest form


PromptInput = Annotated[
    Annotated[str, Tag("text")]
    | Annotated[list[str], Tag("texts")]
    | Annotated[list[int], Tag("token_ids")]
    | Annotated[list[list[int]], Tag("token_lists")],
    Discriminator(_prompt_form),
]
"""A text, several texts, one prompt's token ids, or several prompts' token ids."""


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: PromptInput
    max_tokens: MaxTokens | None = 16
    logprobs: Logprobs | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(Request):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message; extra keys (tool_calls, tool_call_id, ...) reach the chat template."""

    model_config = ConfigDict(strict=True, extra="allow")

    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def template_dict(self) -> dict[str, Any]:
        """The message as the chat template sees it: content parts joined into a string."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "".join(part.text for part in self.content)
        return message


def _at_most_max_messages(value: Any) -> Any:
    if isinstance(value, list) and len(value) > MAX_MESSAGES:
        raise ValueError(f"at most {MAX_MESSAGES} messages are accepted, got {len(value)}")
    return value


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[
        list[ChatMessage], Field(min_length=1), BeforeValidator(_at_most_max_messages)
    ]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: Logprobs | None = None
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


def _unicode(value: str) -> str:
    """Refuse lone UTF-16 surrogates (JSON can spell them; they encode to nothing)."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("must not contain a lone UTF-16 surrogate") from None
    return value


AdapterName = Annotated[
    str, Field(min_length=1, max_length=MAX_ADAPTER_NAME_CHARS), AfterValidator(_unicode)
]
"""An adapter's name: also a model id and a metric label value."""


class LoadAdapterRequest(Request):
    """POST /v1/load_lora_adapter (vLLM's body, and SGLang's `pinned`)."""

    lora_name: AdapterName
    lora_path: str = Field(min_length=1)
    pinned: bool = Field(
        default=False, description="Keep the adapter resident in the pool until it is unloaded."
    )


class UnloadAdapterRequest(Request):
    """POST /v1/unload_lora_adapter (vLLM's body)."""

    lora_name: AdapterName


# -- responses ---------------------------------------------------------------------------------


class Response(BaseModel):
    pass


class Usage(Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(Response):
    """The legacy completions format: parallel lists, one entry per token."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(Response):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(Response):
    content: list[ChatTokenLogprob] = []


class AssistantMessage(Response):
    role: Literal["assistant"] = "assistant"
    content: str = ""


class ChatChoice(Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class Delta(Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(Response):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


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
