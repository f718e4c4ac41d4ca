"""POST /v1/completions: prompts in, OpenAI's `text_completion` objects out.

`echo` puts the prompt before each choice's text and, with `logprobs`, the prompt
tokens' logprobs before the generated ones' (null for the first token, which nothing
predicts): what lm-evaluation-harness's log-likelihood tasks read. `max_tokens: 0` is
accepted with `echo` (the prompt's logprobs only): the engine generates one token, which
is not returned.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace

from fastapi import Request
from fastapi.responses import JSONResponse

from loraserve.engine.core.outputs import CompletionDelta, CompletionOutput, TokenLogprobs
from loraserve.errors import InvalidRequestError
from loraserve.server.auth import Tenant
from loraserve.server.params import (
    checked_grammar,
    refuse_unsupported,
    sampling_params,
    structured_outputs,
)
from loraserve.server.prompts import Prompt, Tokenizing
from loraserve.server.protocol import CompletionRequest
from loraserve.server.request_metrics import Tracker
from loraserve.server.responses import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    Usage,
)
from loraserve.server.serving import (
    Served,
    TokenNamer,
    collect,
    follow,
    merge_deltas,
    prompt_logprobs,
    until_disconnect,
)
from loraserve.server.sse import EventStreamResponse, sse


@dataclass(frozen=True)
class Echo:
    """What a choice of one prompt starts with under `echo`."""

    text: str
    logprobs: list[TokenLogprobs | None]
    token_ids: list[int]


async def create_completion(
    served: Served, body: CompletionRequest, tenant: Tenant, request: Request
) -> JSONResponse | EventStreamResponse:
    """Validate, queue every prompt, then stream or wait for the whole answer."""
    arrival = time.perf_counter()
    model = served.model_name(body.model)
    adapter = served.resolve_adapter(body.model, tenant)
    _refuse_unsupported(body)
    n = body.n or 1
    num_prompts = served.prompts.num_prompts(body.prompt)
    served.limits.check_n(n, num_prompts)
    tenant.check_rate(n * num_prompts)
    checked = await checked_grammar(structured_outputs(body), served.limits, served.grammars)
    max_tokens = 1 if body.max_tokens == 0 else body.max_tokens  # 0: see the module's doc
    params = sampling_params(
        body,
        max_tokens,
        body.logprobs,
        served.limits,
        served.tokenizer,
        checked,
        served.eos_token_ids,
    )
    if body.echo and body.logprobs is not None:  # the prompt's logprobs come back too
        params = replace(params, prompt_logprobs=max(params.prompt_logprobs or 0, body.logprobs))
    tokenizing = Tokenizing(
        add_special_tokens=body.add_special_tokens is not False,
        truncate_prompt_tokens=body.truncate_prompt_tokens,
    )
    prompts = await served.prompts.completion_prompts(body.prompt, tokenizing)
    request_id = f"cmpl-{body.request_id or uuid.uuid4().hex}"
    streams = await served.start(request_id, prompts, params, adapter, tenant, body.cache_salt)
    prompt_lengths = [len(prompt.token_ids) for prompt in prompts]
    tracker = Tracker(served.metrics.requests, model, prompt_lengths, arrival)
    view = _View(served, body, model, prompts)
    if body.stream:
        return EventStreamResponse(
            _events(view, request_id, follow(streams, tracker), tracker), streams
        )
    finals = await until_disconnect(request, collect(streams, tracker))
    choices = [
        view.choice(prompt, index, completion)
        for (prompt, index), completion in sorted(finals.items())
    ]
    usage = tracker.usage()
    if body.max_tokens == 0:  # the one token generated is not the client's
        usage = Usage(prompt_tokens=usage.prompt_tokens, total_tokens=usage.prompt_tokens)
    response = CompletionResponse(id=request_id, model=model, choices=choices, usage=usage)
    return JSONResponse(response.dump())


def _refuse_unsupported(body: CompletionRequest) -> None:
    refuse_unsupported(body)
    n = body.n or 1
    if body.best_of is not None and body.best_of != n:
        raise InvalidRequestError("best_of other than n is not supported", "best_of")
    if body.max_tokens == 0 and not body.echo:
        raise InvalidRequestError("max_tokens must be >= 1 (0 only with echo)", "max_tokens")


class _View:
    """How one request's outputs are shown: echo, logprobs, token ids."""

    def __init__(
        self, served: Served, body: CompletionRequest, model: str, prompts: list[Prompt]
    ) -> None:
        self.served, self.body, self.model, self.prompts = served, body, model, prompts
        self.name: TokenNamer = served.token_namer(bool(body.return_tokens_as_token_ids))
        self.generates = body.max_tokens != 0

    def echo(self, prompt_index: int, logprobs: list[TokenLogprobs | None] | None) -> Echo | None:
        if not self.body.echo:
            return None
        prompt = self.prompts[prompt_index]
        text = prompt.text
        if text is None:
            text = self.served.tokenizer.decode(prompt.token_ids, skip_special_tokens=False)
        return Echo(text, list(logprobs or []), prompt.token_ids)

    def logprobs(
        self, echo: Echo | None, entries: Sequence[TokenLogprobs], text_offset: int
    ) -> CompletionLogprobs | None:
        if self.body.logprobs is None:
            return None
        if echo is None:
            return completion_logprobs(entries, self.name, text_offset)
        return completion_logprobs([*echo_entries(echo), *entries], self.name, text_offset)

    def choice(self, prompt: int, index: int, completion: CompletionOutput) -> CompletionChoice:
        body = self.body
        echo = self.echo(prompt, completion.prompt_logprobs)
        generated = completion.logprobs or [] if self.generates else []
        text = completion.text if self.generates else ""
        choice = CompletionChoice(
            index=prompt * (body.n or 1) + index,
            text=(echo.text if echo else "") + text,
            logprobs=self.logprobs(echo, generated, 0),
            finish_reason=completion.finish_reason if self.generates else "length",
            stop_reason=completion.stop_reason,
        )
        if body.prompt_logprobs is not None:
            decode = self.served.token_namer(False)
            choice.prompt_logprobs = prompt_logprobs(completion.prompt_logprobs, decode)
        if body.return_token_ids:
            choice.prompt_token_ids = self.prompts[prompt].token_ids
            choice.token_ids = completion.token_ids if self.generates else []
        return choice


def echo_entries(echo: Echo) -> list[TokenLogprobs | None]:
    """The echoed prompt's logprob entries: None for the first token."""
    return list(echo.logprobs) or [None] * len(echo.token_ids)


def completion_logprobs(
    entries: Sequence[TokenLogprobs | None], name: TokenNamer, text_offset: int
) -> CompletionLogprobs:
    """The legacy format: parallel lists; `text_offset` of each token in the choice's text.
    An entry None (the first echoed prompt token) has no logprob and no alternatives."""
    result = CompletionLogprobs()
    for entry in entries:
        if entry is None:
            result.tokens.append("")
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            result.text_offset.append(text_offset)
            continue
        token = name(entry.token_id)
        result.tokens.append(token)
        result.token_logprobs.append(entry.logprob)
        top = {name(token_id): logprob for token_id, logprob in entry.top_logprobs}
        result.top_logprobs.append(top)
        result.text_offset.append(text_offset)
        text_offset += len(token)
    return result


async def _events(
    view: _View,
    request_id: str,
    outputs: AsyncIterator[tuple[int, list[CompletionDelta]]],
    tracker: Tracker,
) -> AsyncIterator[str]:
    """One chunk per completion per batch of deltas (what arrived since the last event),
    as OpenAI sends them; the echoed prompt opens each choice's first chunk; usage in
    every chunk (`continuous_usage_stats`) and/or a last chunk of its own when asked for."""
    body = view.body
    created = int(time.time())
    text_lengths: dict[tuple[int, int], int] = {}  # (prompt, completion) -> characters sent
    options = body.stream_options
    continuous = bool(options and options.continuous_usage_stats)
    async for prompt_index, deltas in outputs:
        for delta in merge_deltas(deltas):
            key = (prompt_index, delta.index)
            echo = None if key in text_lengths else view.echo(prompt_index, delta.prompt_logprobs)
            offset = text_lengths.get(key, 0)
            text = delta.new_text if view.generates else ""
            entries = (delta.new_logprobs or []) if view.generates else []
            prefix = echo.text if echo else ""
            text_lengths[key] = offset + len(prefix) + len(text)
            choice = CompletionChoice(
                index=prompt_index * (body.n or 1) + delta.index,
                text=prefix + text,
                logprobs=view.logprobs(echo, entries, offset),
                finish_reason=delta.finish_reason
                if view.generates or not delta.finish_reason
                else "length",
                stop_reason=delta.stop_reason,
            )
            if body.prompt_logprobs is not None and delta.prompt_logprobs is not None:
                choice.prompt_logprobs = prompt_logprobs(
                    delta.prompt_logprobs, view.served.token_namer(False)
                )
            if body.return_token_ids:
                choice.token_ids = delta.new_token_ids if view.generates else []
                if echo is not None or delta.prompt_logprobs is not None:
                    choice.prompt_token_ids = view.prompts[prompt_index].token_ids
            chunk = CompletionChunk(
                id=request_id, created=created, model=view.model, choices=[choice]
            )
            if continuous:
                chunk.usage = tracker.usage()
            yield sse(chunk)
    if options is not None and options.include_usage:
        chunk = CompletionChunk(
            id=request_id, created=created, model=view.model, choices=[], usage=tracker.usage()
        )
        yield sse(chunk)
