"""POST /v1/chat/completions: messages rendered with the model's chat template."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse

from loraserve.engine.outputs import CompletionDelta, CompletionOutput, TokenLogprobs
from loraserve.errors import InvalidRequestError
from loraserve.server.auth import Tenant
from loraserve.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    Delta,
    TopLogprob,
)
from loraserve.server.serving import (
    EventStreamResponse,
    Served,
    TokenNamer,
    Tracker,
    collect,
    fields_as_sent,
    follow,
    merge_deltas,
    sampling_params,
    sse,
    until_disconnect,
)


async def create_chat_completion(
    served: Served, body: ChatCompletionRequest, tenant: Tenant, request: Request
) -> JSONResponse | EventStreamResponse:
    """Validate, render and queue the conversation, then stream or wait for the answer."""
    arrival = time.perf_counter()
    adapter = served.resolve_adapter(body.model, tenant)
    _refuse_unsupported(body)
    served.limits.check_n(body.n, 1)
    tenant.check_rate(body.n)
    # OpenAI's newer name wins when both are sent; 0 is refused either way, as in vLLM.
    max_tokens = (
        body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
    )
    renamed = {"logprobs": "top_logprobs"}
    if body.max_completion_tokens is not None:
        renamed["max_tokens"] = "max_completion_tokens"
    with fields_as_sent(renamed):
        params = sampling_params(body, max_tokens, _num_top_logprobs(body), served.limits)
        messages = [message.template_dict() for message in body.messages]
        prompt = await served.prompts.chat_prompt(messages, body.add_generation_prompt)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await served.start(request_id, [prompt], params, adapter, tenant)
    tracker = Tracker(served.metrics, body.model, len(prompt.token_ids), arrival)
    if body.stream:
        events = _events(served, body, request_id, follow(streams, tracker), tracker)
        return EventStreamResponse(events, streams)
    finals = await until_disconnect(request, collect(streams, tracker))
    name = served.token_namer(body.return_tokens_as_token_ids)
    choices = [
        _choice(index, completion, body.logprobs, name)
        for (_, index), completion in sorted(finals.items())
    ]
    response = ChatCompletionResponse(
        id=request_id, model=body.model, choices=choices, usage=tracker.usage()
    )
    return JSONResponse(response.model_dump())


def _num_top_logprobs(body: ChatCompletionRequest) -> int | None:
    """The engine's `logprobs`: None unless `logprobs: true`, then `top_logprobs` (0 default)."""
    if body.logprobs:
        return body.top_logprobs or 0
    if body.top_logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs: true", "top_logprobs")
    return None


def _refuse_unsupported(body: ChatCompletionRequest) -> None:
    if body.tools and body.tool_choice != "none":
        raise InvalidRequestError("tool calling is not supported", "tools")
    if body.response_format is not None and body.response_format.get("type") != "text":
        raise InvalidRequestError("only response_format type text is supported", "response_format")


def _choice(
    index: int, completion: CompletionOutput, with_logprobs: bool, name: TokenNamer
) -> ChatChoice:
    logprobs = chat_logprobs(completion.logprobs or [], name) if with_logprobs else None
    return ChatChoice(
        index=index,
        message=AssistantMessage(content=completion.text),
        logprobs=logprobs,
        finish_reason=completion.finish_reason,
        stop_reason=completion.stop_reason,
    )


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
    served: Served,
    body: ChatCompletionRequest,
    request_id: str,
    outputs: AsyncIterator[tuple[int, list[CompletionDelta]]],
    tracker: Tracker,
) -> AsyncIterator[str]:
    """A role chunk per choice, then content deltas, finish reasons, and usage if asked."""
    created = int(time.time())
    name = served.token_namer(body.return_tokens_as_token_ids)

    def chunk(choices: list[ChatChunkChoice]) -> str:
        return sse(
            ChatCompletionChunk(id=request_id, created=created, model=body.model, choices=choices)
        )

    for index in range(body.n):
        yield chunk([ChatChunkChoice(index=index, delta=Delta(role="assistant", content=""))])
    async for _, deltas in outputs:
        for delta in merge_deltas(deltas):  # one chunk per choice, as OpenAI sends them
            logprobs = None
            if body.logprobs:
                logprobs = chat_logprobs(delta.new_logprobs or [], name)
            if not (delta.new_text or delta.finish_reason or logprobs):
                continue  # text held back (a partial character or a possible stop string)
            choice = ChatChunkChoice(
                index=delta.index,
                delta=Delta(content=delta.new_text),
                logprobs=logprobs,
                finish_reason=delta.finish_reason,
                stop_reason=delta.stop_reason,
            )
            yield chunk([choice])
    if body.stream_options is not None and body.stream_options.include_usage:
        usage = ChatCompletionChunk(
            id=request_id, created=created, model=body.model, choices=[], usage=tracker.usage()
        )
        yield sse(usage)
