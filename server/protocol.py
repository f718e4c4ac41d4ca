"""OpenAI's and vLLM's request bodies, as pydantic models (responses: server/responses.py).

The rule: every field a body may carry is either honoured or refused with a 400 that
names it (server/params.py refuses; tests/server/test_api_parameter_rule.py walks these
models and sends each field with a value that would change the output). Fields that
change nothing about the output (`user`, `metadata`, ...: `params.NO_EFFECT`) are
accepted and ignored. Unknown fields are ignored with a
warning in the log, as vLLM does, so that clients sending newer fields still work: a
field from OpenAI's or vLLM's API that could change the output is declared here, so an
unknown one is neither's.

`null` means "the default" wherever OpenAI allows it (`n`, `stream`, `logprobs`,
`echo`, `stream_options.include_usage`, ...). Requests validate strictly otherwise (a
string where a number belongs is a 400, not a silent conversion).

Validation runs on the event loop, so its cost must not grow with what a client can
pack into a body faster than the body's size: a completions `prompt` is validated as
the one form its first element says (a list of a million token ids is read once, not
tried against every form in turn), and a conversation longer than `MAX_MESSAGES` is
refused before its messages are validated. Sizes that depend on the served model or
the server's limits are checked after validation (server/prompts.py, server/limits.py).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    model_validator,
)

from loraserve.engine.core.sampling_params import (
    MAX_LOGPROBS,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    MIN_REPETITION_PENALTY,
)

logger = logging.getLogger(__name__)

MAX_MESSAGES = 4096
"""Most messages in one conversation; validating each costs a few microseconds of the
event loop."""
MAX_ADAPTER_NAME_CHARS = 256
"""Longest adapter name (it is also a model id and a metric label value)."""
MAX_WARNED_FIELDS = 1024
"""Unknown field names warned about once each (then silently ignored), so that a client
inventing names cannot flood the log."""
_warned_fields: set[str] = set()


class StrictBody(BaseModel):
    """A request body: strict types, unknown fields ignored with a warning (once each)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _warn_unknown(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = set(data) - _known_keys(cls) - _warned_fields
            if unknown and len(_warned_fields) < MAX_WARNED_FIELDS:
                _warned_fields.update(unknown)
                logger.warning(
                    "ignored unknown field(s) of %s (warned once each): %s",
                    cls.__name__,
                    ", ".join(sorted(repr(name[:64]) for name in unknown)),
                )
        return data


def _known_keys(model: type[BaseModel]) -> set[str]:
    """The keys a body of `model` may carry: its fields' names and their aliases (`schema`)."""
    return {key for name, info in model.model_fields.items() for key in (name, info.alias) if key}


class StreamOptions(StrictBody):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None
    """vLLM's: usage in every chunk, not only in a last one of its own."""


class JsonSchemaFormat(StrictBody):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictBody):
    """OpenAI's `response_format`: text, any JSON object, or JSON under a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsBody(StrictBody):
    """vLLM's `structured_outputs` (exactly one of the first five)."""

    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    whitespace_pattern: str | None = None
    disable_any_whitespace: bool | None = None
    disable_additional_properties: bool | None = None
    disable_fallback: bool | None = None


Penalty = Annotated[float, Field(ge=-2, le=2)]
Logprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]
MaxTokens = Annotated[int, Field(ge=1)]
TokenId = Annotated[int, Field(ge=0)]


class SamplingFields(StrictBody):
    """What both generation endpoints accept: OpenAI's fields, then vLLM's extras.

    The ranges are SamplingParams' (engine/core/sampling_params.py, which says why), stated
    here too so that the OpenAPI schema tells clients (and fuzzers) what is accepted;
    limits on counts are the server's (server/limits.py)."""

    model: str | None = None
    """The adapter, or the base model's name; absent = the base model (as vLLM)."""
    n: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=MAX_TEMPERATURE)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # vLLM's sampling extras
    top_k: Annotated[int, Field(ge=-1, le=MAX_TOP_K)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    ignore_eos: bool | None = None
    repetition_penalty: Annotated[float, Field(ge=MIN_REPETITION_PENALTY, le=2)] | None = None
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    allowed_token_ids: list[TokenId] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: Logprobs | None = None
    return_tokens_as_token_ids: bool | None = None
    """Logprobs name tokens `token_id:ID` instead of their text."""
    return_token_ids: bool | None = None
    """The prompt's and each choice's token ids in the response."""
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = None
    """Keep only the last this many prompt tokens (-1: as many as the context holds)."""
    add_special_tokens: bool | None = None
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    early_stopping: bool | None = None
    logits_processors: list[Any] | None = None
    priority: int | None = None
    request_id: str | None = None
    """Used in the response's id (`cmpl-<request_id>`), as vLLM does."""
    cache_salt: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, Any] | None = None
    # vLLM's structured output, older and newer spellings
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None


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
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    """0 only with `echo` (the prompt's logprobs, nothing generated, as OpenAI allowed)."""
    logprobs: Logprobs | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(StrictBody):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message; extra keys (tool_calls, tool_call_id, ...) reach the chat template."""

    model_config = ConfigDict(strict=True, extra="allow")

    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def template_dict(self) -> dict[str, Any]:
        """The message as the chat template sees it: content parts joined into a string, and
        no content (an assistant's tool calls: `content: null`) an empty one, as vLLM does."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "".join(part.text for part in self.content)
        message.setdefault("content", "")
        return message


def _at_most_max_messages(value: Any) -> Any:
    if isinstance(value, list) and len(value) > MAX_MESSAGES:
        raise ValueError(f"at most {MAX_MESSAGES} messages are accepted, got {len(value)}")
    return value


class FunctionDefinition(StrictBody):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(StrictBody):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(StrictBody):
    name: str


class NamedToolChoice(StrictBody):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[
        list[ChatMessage], Field(min_length=1), BeforeValidator(_at_most_max_messages)
    ]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: Logprobs | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    # vLLM's chat extras
    echo: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None
    include_reasoning: bool | None = None
    mm_processor_kwargs: dict[str, Any] | None = None


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


class LoadAdapterRequest(StrictBody):
    """POST /v1/load_lora_adapter (vLLM's body, and SGLang's `pinned`)."""

    lora_name: AdapterName
    lora_path: str = Field(min_length=1)
    pinned: bool = Field(
        default=False, description="Keep the adapter resident in the pool until it is unloaded."
    )


class UnloadAdapterRequest(StrictBody):
    """POST /v1/unload_lora_adapter (vLLM's body)."""

    lora_name: AdapterName


class TokenizeRequest(StrictBody):
    """POST /tokenize (vLLM's body): a prompt, or messages rendered by the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: (
        Annotated[list[ChatMessage], Field(min_length=1), BeforeValidator(_at_most_max_messages)]
        | None
    ) = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    return_token_strs: bool | None = None


class DetokenizeRequest(StrictBody):
    """POST /detokenize (vLLM's body)."""

    model: str | None = None
    tokens: list[TokenId]
