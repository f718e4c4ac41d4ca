"""POST /v1/completions: prompts in, OpenAI's `text_completion` objects out."""

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
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from loraserve.server.serving import (
    EventStreamResponse,
    Served,
    TokenNamer,
    Tracker,
    collect,
    follow,
    merge_deltas,
    sampling_params,
    sse,
    until_disconnect,
)


async def create_completion(
    served: Served, body: CompletionRequest, tenant: Tenant, request: Request
) -> JSONResponse | EventStreamResponse:
    """Validate, queue every prompt, then stream or wait for the whole answer."""
    arrival = time.perf_counter()
    adapter = served.resolve_adapter(body.model, tenant)
    _refuse_unsupported(body)
    num_prompts = served.prompts.num_prompts(body.prompt)
    served.limits.check_n(body.n, num_prompts)
    tenant.check_rate(body.n * num_prompts)
    params = sampling_params(body, body.max_tokens, body.logprobs, served.limits)
    prompts = await served.prompts.completion_prompts(body.prompt)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    streams = await served.start(request_id, prompts, params, adapter, tenant)
    num_prompt_tokens = sum(len(prompt.token_ids) for prompt in prompts)
    tracker = Tracker(served.metrics, body.model, num_prompt_tokens, arrival)
    if body.stream:
        events = _events(served, body, request_id, follow(streams, tracker), tracker)
        return EventStreamResponse(events, streams)
    finals = await until_disconnect(request, collect(streams, tracker))
    name = served.token_namer(body.return_tokens_as_token_ids)
    choices = [
        _choice(prompt * body.n + index, completion, body.logprobs is not None, name)
        for (prompt, index), completion in sorted(finals.items())
    ]
    response = CompletionResponse(
        id=request_id, model=body.model, choices=choices, usage=tracker.usage()
    )
    return JSONResponse(response.model_dump())


def _refuse_unsupported(body: CompletionRequest) -> None:
    if body.echo:
        raise InvalidRequestError("echo is not supported", "echo")
    if body.suffix:
        raise InvalidRequestError("suffix is not supported", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise InvalidRequestError("best_of other than n is not supported", "best_of")


def _choice(
    index: int, completion: CompletionOutput, with_logprobs: bool, name: TokenNamer
) -> CompletionChoice:
    logprobs = None
    if with_logprobs:
        logprobs = completion_logprobs(completion.logprobs or [], name, 0)
    return CompletionChoice(
        index=index,
        text=completion.text,
        logprobs=logprobs,
        finish_reason=completion.finish_reason,
        stop_reason=completion.stop_reason,
    )


def completion_logprobs(
    entries: Sequence[TokenLogprobs], name: TokenNamer, text_offset: int
) -> CompletionLogprobs:
    """The legacy format: parallel lists; `text_offset` of each token in the choice's text."""
    result = CompletionLogprobs()
    for entry in entries:
        token = name(entry.token_id)
        result.tokens.append(token)
        result.token_logprobs.append(entry.logprob)
        top = {name(token_id): logprob for token_id, logprob in entry.top_logprobs}
        result.top_logprobs.append(top)
        result.text_offset.append(text_offset)
        text_offset += len(token)
    return result


async def _events(
    served: Served,
    body: CompletionRequest,
    request_id: str,
    outputs: AsyncIterator[tuple[int, list[CompletionDelta]]],
    tracker: Tracker,
) -> AsyncIterator[str]:
    """One chunk per completion per batch of deltas (what arrived since the last event),
    as OpenAI sends them; a usage chunk last when asked for."""
    created = int(time.time())
    text_lengths: dict[tuple[int, int], int] = {}  # (prompt, completion) -> characters sent
    name = served.token_namer(body.return_tokens_as_token_ids)
    async for prompt_index, deltas in outputs:
        for delta in merge_deltas(deltas):
            key = (prompt_index, delta.index)
            offset = text_lengths.get(key, 0)
            text_lengths[key] = offset + len(delta.new_text)
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(delta.new_logprobs or [], name, offset)
            choice = CompletionChoice(
                index=prompt_index * body.n + delta.index,
                text=delta.new_text,
                logprobs=logprobs,
                finish_reason=delta.finish_reason,
                stop_reason=delta.stop_reason,
            )
            yield sse(
                CompletionChunk(id=request_id, created=created, model=body.model, choices=[choice])
            )
    if body.stream_options is not None and body.stream_options.include_usage:
        chunk = CompletionChunk(
            id=request_id, created=created, model=body.model, choices=[], usage=tracker.usage()
        )
        yield sse(chunk)
