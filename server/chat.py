"""POST /v1/chat/completions: messages rendered with the model's chat template.

Tools reach the template (`tools`), `tool_choice` decides how the output is read
(server/tools.py); `response_format` and vLLM's structured-output fields constrain it.
`echo` puts the last message's content (when it is the assistant's, as vLLM does)
before the answer; `continue_final_message` lets the model continue that message.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from loraserve.engine.core.outputs import CompletionDelta, CompletionOutput, TokenLogprobs
from loraserve.engine.core.sampling_params import SamplingParams
from loraserve.errors import InvalidRequestError
from loraserve.server.auth import Tenant
from loraserve.server.params import (
    checked_grammar,
    refuse_unsupported,
    sampling_params,
    structured_outputs,
)
from loraserve.server.prompts import ChatRendering, Prompt, Tokenizing
from loraserve.server.protocol import ChatCompletionRequest
from loraserve.server.request_metrics import Tracker
from loraserve.server.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    Delta,
    TopLogprob,
)
from loraserve.server.serving import (
    Served,
    TokenNamer,
    collect,
    fields_as_sent,
    follow,
    merge_deltas,
    prompt_logprobs,
    until_disconnect,
)
from loraserve.server.sse import EventStreamResponse, sse
from loraserve.server.tool_stream import ToolStream, finish_reason, message
from loraserve.server.tools import ToolMode, tool_constraint, tool_mode

RESERVED_TEMPLATE_VARIABLES = frozenset(
    {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}
)
"""Variables `chat_template_kwargs` may not set: the server sets them."""


async def create_chat_completion(
    served: Served, body: ChatCompletionRequest, tenant: Tenant, request: Request
) -> JSONResponse | EventStreamResponse:
    """Validate, render and queue the conversation, then stream or wait for the answer."""
    arrival = time.perf_counter()
    model = served.model_name(body.model)
    adapter = served.resolve_adapter(body.model, tenant)
    refuse_unsupported(body)
    mode = tool_mode(body, served.tool_call_parser)
    n = body.n or 1
    served.limits.check_n(n, 1)
    tenant.check_rate(n)
    with fields_as_sent(_renamed(body)):
        params = await _params(served, body, mode)
        prompt = await served.prompts.chat_prompt(
            [_template_message(m.template_dict()) for m in body.messages],
            _rendering(served, body, mode),
            Tokenizing(bool(body.add_special_tokens), body.truncate_prompt_tokens),
        )
        request_id = f"chatcmpl-{body.request_id or uuid.uuid4().hex}"
        streams = await served.start(request_id, [prompt], params, adapter, tenant, body.cache_salt)
    tracker = Tracker(served.metrics.requests, model, [len(prompt.token_ids)], arrival)
    view = _View(served, body, model, mode, prompt)
    if body.stream:
        return EventStreamResponse(
            _events(view, request_id, follow(streams, tracker), tracker), streams
        )
    finals = await until_disconnect(request, collect(streams, tracker))
    completions = [completion for _, completion in sorted(finals.items())]
    response = ChatCompletionResponse(
        id=request_id,
        model=model,
        choices=[view.choice(completion) for completion in completions],
        usage=tracker.usage(),
    )
    if body.prompt_logprobs is not None:
        response.prompt_logprobs = prompt_logprobs(
            completions[0].prompt_logprobs, served.token_namer(False)
        )
    if body.return_token_ids:
        response.prompt_token_ids = prompt.token_ids
    return JSONResponse(response.dump())


def _renamed(body: ChatCompletionRequest) -> dict[str, str]:
    """Engine names -> the names this body used (errors name what was sent)."""
    renamed = {"logprobs": "top_logprobs"}
    if body.max_completion_tokens is not None:
        renamed["max_tokens"] = "max_completion_tokens"
    return renamed


async def _params(served: Served, body: ChatCompletionRequest, mode: ToolMode) -> SamplingParams:
    found = structured_outputs(body)
    served.limits.check_tools(body.tools)
    constraint = tool_constraint(body, mode)
    if constraint is not None:
        if found is not None:
            raise InvalidRequestError(
                f"tool_choice {mode.kind!r} constrains the output already; drop {found[1]}",
                found[1],
            )
        found = (constraint, "tools")
    checked = await checked_grammar(found, served.limits, served.grammars)
    # OpenAI's newer name wins when both are sent; 0 is refused either way, as in vLLM.
    max_tokens = (
        body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
    )
    params = sampling_params(
        body,
        max_tokens,
        _num_top_logprobs(body),
        served.limits,
        served.tokenizer,
        checked,
        served.eos_token_ids,
    )
    if mode.parser == "mistral":  # [TOOL_CALLS] is a special token: keep it in the text
        params = replace(params, skip_special_tokens=False)
    return params


def _rendering(served: Served, body: ChatCompletionRequest, mode: ToolMode) -> ChatRendering:
    if body.chat_template is not None and not served.trust_request_chat_template:
        raise InvalidRequestError(
            "chat_template: this server runs only its own chat templates (start it with "
            "--trust-request-chat-template to allow a request's)",
            "chat_template",
        )
    variables: dict[str, Any] = dict(body.chat_template_kwargs or {})
    reserved = RESERVED_TEMPLATE_VARIABLES & set(variables)
    if reserved:
        raise InvalidRequestError(
            f"chat_template_kwargs may not set {', '.join(sorted(reserved))}",
            "chat_template_kwargs",
        )
    if body.documents is not None:
        variables["documents"] = body.documents
    if body.reasoning_effort is not None:
        variables["reasoning_effort"] = body.reasoning_effort
    continue_final = bool(body.continue_final_message)
    add_generation_prompt = body.add_generation_prompt
    if add_generation_prompt is None:
        add_generation_prompt = not continue_final
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
    # Hermes' words ask for <tool_call> tags: only where the hermes parser reads them (a
    # grammar forces `required` and named calls into another form).
    describe = mode.kind == "auto" and mode.parser == "hermes"
    return ChatRendering(
        add_generation_prompt, continue_final, tools, body.chat_template, variables, describe
    )


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    """Tool calls in the history with their arguments as objects, as templates expect
    them (OpenAI sends JSON text; vLLM converts it the same way)."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return message
    converted = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if isinstance(function, dict) and isinstance(arguments, str):
            try:
                function = {**function, "arguments": json.loads(arguments)}
            except ValueError:
                raise InvalidRequestError(
                    "messages: a tool call's arguments must be JSON", "messages"
                ) from None
            call = {**call, "function": function}
        converted.append(call)
    return {**message, "tool_calls": converted}


def _num_top_logprobs(body: ChatCompletionRequest) -> int | None:
    """The engine's `logprobs`: None unless `logprobs: true`, then `top_logprobs` (0 default)."""
    if body.logprobs:
        return body.top_logprobs or 0
    if body.top_logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs: true", "top_logprobs")
    return None


class _View:
    """How one request's outputs are shown: echo, tool calls, logprobs, token ids."""

    def __init__(
        self,
        served: Served,
        body: ChatCompletionRequest,
        model: str,
        mode: ToolMode,
        prompt: Prompt,
    ) -> None:
        self.served, self.body, self.model, self.mode, self.prompt = (
            served,
            body,
            model,
            mode,
            prompt,
        )
        self.name: TokenNamer = served.token_namer(bool(body.return_tokens_as_token_ids))
        self.parallel = body.parallel_tool_calls is not False
        last = body.messages[-1].template_dict()
        self.echo = ""
        if body.echo and last.get("role") == "assistant" and isinstance(last.get("content"), str):
            self.echo = last["content"]

    def logprobs(self, entries: Sequence[TokenLogprobs] | None) -> ChatLogprobs | None:
        return chat_logprobs(entries or [], self.name) if self.body.logprobs else None

    def choice(self, completion: CompletionOutput) -> ChatChoice:
        answer = message(self.mode, completion.text, self.parallel)
        if self.echo:
            answer.content = self.echo + (answer.content or "")
        choice = ChatChoice(
            index=completion.index,
            message=answer,
            logprobs=self.logprobs(completion.logprobs),
            finish_reason=finish_reason(
                self.mode, completion.finish_reason, bool(answer.tool_calls)
            ),
            stop_reason=completion.stop_reason,
        )
        if self.body.return_token_ids:
            choice.token_ids = completion.token_ids
        return choice


def chat_logprobs(entries: Sequence[TokenLogprobs], name: TokenNamer) -> ChatLogprobs:
    """OpenAI's chat format: one object per token with its top alternatives."""

    def top(token_id: int, logprob: float) -> TopLogprob:
        token = name(token_id)
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))

    content = []
    for entry in entries:
        chosen = top(entry.token_id, entry.logprob)
        alternatives = [top(i, p) for i, p in entry.top_logprobs]
        content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=alternatives))
    return ChatLogprobs(content=content)


async def _events(
    view: _View,
    request_id: str,
    outputs: AsyncIterator[tuple[int, list[CompletionDelta]]],
    tracker: Tracker,
) -> AsyncIterator[str]:
    """A role chunk per choice (with the echo), then content or tool-call deltas, finish
    reasons, and usage if asked."""
    body = view.body
    created = int(time.time())
    options = body.stream_options
    continuous = bool(options and options.continuous_usage_stats)

    def chunk(choices: list[ChatChunkChoice], first: bool = False) -> str:
        event = ChatCompletionChunk(
            id=request_id, created=created, model=view.model, choices=choices
        )
        if continuous:
            event.usage = tracker.usage()
        if first and body.return_token_ids:
            event.prompt_token_ids = view.prompt.token_ids
        return sse(event)

    n = body.n or 1
    streams = [ToolStream(view.mode, view.parallel) for _ in range(n)]
    for index in range(n):
        role = ChatChunkChoice(index=index, delta=Delta(role="assistant", content=view.echo))
        yield chunk([role], first=index == 0)
    async for _, deltas in outputs:
        for delta in merge_deltas(deltas):  # one chunk per choice, as OpenAI sends them
            choice = _chunk_choice(view, streams[delta.index], delta)
            if choice is not None:
                event = ChatCompletionChunk(
                    id=request_id, created=created, model=view.model, choices=[choice]
                )
                if continuous:
                    event.usage = tracker.usage()
                if body.prompt_logprobs is not None and delta.prompt_logprobs is not None:
                    event.prompt_logprobs = prompt_logprobs(
                        delta.prompt_logprobs, view.served.token_namer(False)
                    )
                yield sse(event)
    if options is not None and options.include_usage:
        usage = ChatCompletionChunk(
            id=request_id, created=created, model=view.model, choices=[], usage=tracker.usage()
        )
        yield sse(usage)


def _chunk_choice(
    view: _View, stream: ToolStream, delta: CompletionDelta
) -> ChatChunkChoice | None:
    """The chunk of one choice for one delta; None when there is nothing to send yet
    (text held back: a partial character, a possible stop string or tool-call tag)."""
    content, calls = stream.feed(delta.new_text, delta.finished)
    logprobs = view.logprobs(delta.new_logprobs) if view.body.logprobs else None
    if not (content or calls or delta.finish_reason or logprobs):
        return None
    choice = ChatChunkChoice(
        index=delta.index,
        delta=Delta(content=content or None, tool_calls=calls or None),
        logprobs=logprobs,
        finish_reason=finish_reason(view.mode, delta.finish_reason, stream.called),
        stop_reason=delta.stop_reason,
    )
    if view.body.return_token_ids:
        choice.token_ids = delta.new_token_ids
    return choice
