"""What both generation routes share: choosing the adapter, checking the request against
the limits, building sampling params, handing prompts to the engine, following their
outputs, SSE framing, disconnects.

One HTTP request may carry several prompts (completions) and `n` completions per
prompt; each prompt is one engine request (its `n` completions are sub-requests),
and a choice's index is `prompt_index * n + completion_index`, as OpenAI numbers them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from fastapi import Request

from loraserve.engine.client.async_engine import AsyncEngine, RequestStream
from loraserve.engine.core.outputs import CompletionDelta, CompletionOutput, TokenLogprobs
from loraserve.engine.core.request import EngineRequest
from loraserve.engine.core.sampling_params import SamplingParams
from loraserve.errors import AdapterError, InvalidRequestError
from loraserve.models.tokenizer import Tokenizer
from loraserve.server.auth import OPEN_TENANT, Tenant
from loraserve.server.errors import APIError, model_not_found
from loraserve.server.grammar_check import GrammarChecker
from loraserve.server.limits import RequestLimits
from loraserve.server.metrics import ServerMetrics
from loraserve.server.prompts import Prompt, PromptBuilder
from loraserve.server.request_metrics import Tracker
from loraserve.server.responses import PromptLogprobs, TokenLogprobEntry

T = TypeVar("T")
TokenNamer = Callable[[int], str]
"""How logprobs name a token id: its text, or `token_id:ID`."""


TOKEN_TEXT_CACHE = 1 << 16
"""Token ids whose text is kept (a vocabulary of up to 65536 tokens, whole)."""


@dataclass
class Served:
    """The engine and what the routes need to know about it."""

    engine: AsyncEngine
    metrics: ServerMetrics
    base_model: str
    max_model_len: int
    limits: RequestLimits
    prompts: PromptBuilder
    tool_call_parser: str | None = None
    """`--tool-call-parser`: how `tool_choice: auto` finds tool calls in the output."""
    trust_request_chat_template: bool = False
    """Whether a request may bring its own `chat_template`."""
    grammars: GrammarChecker = field(init=False)
    """Compiles requests' output constraints in child processes, with the engine's tokenizer."""
    base_model_names: tuple[str, ...] = field(init=False)
    """The base model's names that /v1/models lists (`--served-model-name a b`); `base_model`
    is the first."""
    accepted_names: frozenset[str] = field(init=False)
    """Those, and `--model` as given when no name is (vLLM's default name, a path: accepted
    but not listed, since it would show tenants the server's disk)."""

    def __post_init__(self) -> None:
        info = self.engine.info
        assert info is not None, "the engine is started"
        self.base_model_names = tuple(dict.fromkeys((self.base_model, *info.served_model_names)))
        model = self.engine.config.model
        path_name = () if model.served_model_name else (model.model,)
        self.accepted_names = frozenset((*self.base_model_names, *path_name))
        for name in self.engine.adapters:
            self.check_adapter_name(name)
        tokenizer = self.tokenizer
        vocab_size = max(info.vocab_size, tokenizer.vocab_size)  # as the core's GrammarCompiler
        self.grammars = GrammarChecker(tokenizer.backend.to_str(), vocab_size, info.eos_token_ids)
        # A token's text never changes: logprobs name the same tokens over and over.
        self._token_text = functools.lru_cache(maxsize=TOKEN_TEXT_CACHE)(
            lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False)
        )

    def adapter_path(self, name: str) -> Path | None:
        """The folder of adapter `name` (registered, or in the adapter dir); None if none."""
        return None if name in self.accepted_names else self.engine.names.folder(name)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        info = self.engine.info
        return () if info is None else info.eos_token_ids

    def check_adapter_name(self, name: str) -> None:
        """An adapter may not take a name of the base model: requests for it would never
        reach the adapter, and /v1/models would list the name twice."""
        if name in self.accepted_names:
            raise InvalidRequestError(
                f"adapter name {name!r} is the base model's name; choose another", "lora_name"
            )

    def model_name(self, model: str | None) -> str:
        """The `model` a response names: the base model's first name for any of its names
        or none (as vLLM answers), else the adapter's."""
        return self.base_model if model is None or model in self.accepted_names else model

    def token_namer(self, as_token_ids: bool) -> TokenNamer:
        if as_token_ids:
            return lambda token_id: f"token_id:{token_id}"
        return self._token_text  # type: ignore[no-any-return]

    def resolve_adapter(self, model: str | None, tenant: Tenant) -> str | None:
        """The adapter `model` names (None = the base model, as is an absent `model`); 404
        if unknown or not the tenant's, with the same message so that other tenants'
        adapters stay unseen."""
        if model is None or model in self.accepted_names:
            adapter = None
        elif self.adapter_path(model) is not None:
            adapter = model
        else:
            raise model_not_found(model)
        if not tenant.may_use(adapter):
            raise model_not_found(model)
        return adapter

    async def start(
        self,
        request_id: str,
        prompts: list[Prompt],
        params: SamplingParams,
        adapter: str | None,
        tenant: Tenant,
        cache_salt: str | None = None,
    ) -> list[RequestStream]:
        """Queue every prompt (`n` completions each), or none, in one message: the core weighs
        them all against its waiting queue at once. An adapter on disk only is read first
        (these requests wait; the others do not). `cache_salt` narrows the tenant's cache."""
        path = None if adapter is None else self.adapter_path(adapter)
        requests = [
            EngineRequest(
                request_id if len(prompts) == 1 else f"{request_id}-p{index}",
                prompt.token_ids,
                params,
                adapter,
                None if path is None else str(path),
                tenant.name,
                tenant.weight,
                tenant.cache_scope_of(cache_salt),
            )
            for index, prompt in enumerate(prompts)
        ]
        try:
            return await self.engine.add_requests(requests)
        except AdapterError as error:
            if adapter is not None:
                raise adapter_unavailable(adapter, path, error) from None
            raise


def adapter_unavailable(adapter: str, path: Path | None, error: AdapterError) -> APIError:
    """The 400 of a request whose adapter's folder was refused when read (or before: the
    refusal is remembered until the folder changes). The folder is not named: tenants
    never see where adapters live."""
    message = str(error).replace(f"adapter folder '{path}'", f"the folder of adapter {adapter!r}")
    return APIError(
        400, f"adapter {adapter!r} cannot be loaded: {message}", "model", "invalid_adapter"
    )


@contextlib.contextmanager
def fields_as_sent(renamed: dict[str, str]) -> Iterator[None]:
    """Errors name a field as the client sent it: the engine says `max_tokens` and
    `logprobs` where a chat client sent `max_completion_tokens` and `top_logprobs`."""
    try:
        yield
    except InvalidRequestError as error:
        if error.param not in renamed:
            raise
        old, new = error.param, renamed[error.param]
        message = str(error)
        if message.startswith(old):
            message = new + message[len(old) :]
        raise InvalidRequestError(message, new) from None


def prompt_logprobs(
    entries: list[TokenLogprobs | None] | None, decode: Callable[[int], str]
) -> PromptLogprobs | None:
    """vLLM's `prompt_logprobs`: per prompt token, its logprob and its top alternatives'."""
    if entries is None:
        return None
    result: PromptLogprobs = []
    for entry in entries:
        if entry is None:
            result.append(None)
            continue
        alternatives = {entry.token_id: (entry.logprob, entry.rank)}
        for rank, (token_id, logprob) in enumerate(entry.top_logprobs, start=1):
            alternatives.setdefault(token_id, (logprob, rank))
        result.append(
            {
                str(token_id): TokenLogprobEntry(
                    logprob=logprob, rank=rank, decoded_token=decode(token_id)
                )
                for token_id, (logprob, rank) in alternatives.items()
            }
        )
    return result


def merge_deltas(deltas: list[CompletionDelta]) -> list[CompletionDelta]:
    """One delta per completion, in order of first appearance: a consumer slower than the
    engine sends one event for what several steps produced, not one per step."""
    merged: dict[int, CompletionDelta] = {}
    for delta in deltas:
        first = merged.get(delta.index)
        if first is None:
            merged[delta.index] = delta
            continue
        first.new_text += delta.new_text
        first.new_token_ids = first.new_token_ids + delta.new_token_ids
        if delta.new_logprobs is not None:
            first.new_logprobs = (first.new_logprobs or []) + delta.new_logprobs
        first.finish_reason, first.stop_reason = delta.finish_reason, delta.stop_reason
        first.num_tokens, first.error = delta.num_tokens, delta.error
    return list(merged.values())


async def follow(
    streams: list[RequestStream], tracker: Tracker
) -> AsyncIterator[tuple[int, list[CompletionDelta]]]:
    """(prompt index, deltas of that prompt's completions) as they come; aborts all on exit."""
    outcome = "failed"
    try:
        async for index, deltas in _merge(streams):
            for delta in deltas:
                tracker.observe(index, delta)
            yield index, deltas
        outcome = "finished"
    except (asyncio.CancelledError, GeneratorExit):
        outcome = "aborted"
        raise
    finally:
        for stream in streams:
            stream.abort()
        tracker.close(outcome)


async def _merge(
    streams: list[RequestStream],
) -> AsyncIterator[tuple[int, list[CompletionDelta]]]:
    """Interleave several streams (one task per stream feeds a shared queue); one stream
    is read directly."""
    if len(streams) == 1:
        async for deltas in streams[0]:
            yield 0, deltas
        return
    queue: asyncio.Queue[tuple[int, list[CompletionDelta] | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for deltas in stream:
                queue.put_nowait((index, deltas))
            queue.put_nowait((index, None))
        except Exception as error:
            queue.put_nowait((index, error))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def collect(
    streams: list[RequestStream], tracker: Tracker
) -> dict[tuple[int, int], CompletionOutput]:
    """Every completion, whole, by (prompt index, completion index)."""
    finals: dict[tuple[int, int], CompletionOutput] = {}
    async for prompt_index, deltas in follow(streams, tracker):
        for delta in deltas:
            key = (prompt_index, delta.index)
            finals.setdefault(key, CompletionOutput(delta.index)).add(delta)
    return finals


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (which aborts its
    engine requests). A non-streaming response has no other way to notice."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        # Nobody will read this; the status is what access logs show.
        raise APIError(499, "the client closed the connection", code="client_closed")
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def served_of(request: Request) -> Served:
    return request.app.state.served  # type: ignore[no-any-return]


def tenant_of(request: Request) -> Tenant:
    """The caller, as AuthMiddleware found it."""
    return getattr(request.state, "tenant", OPEN_TENANT)


def unavailable(request: Request) -> APIError | None:
    """Why this server should get no traffic now (engine stopped, or draining); None if
    it should: what /health and /ping answer."""
    if not served_of(request).engine.is_healthy:
        return APIError(503, "the engine is not running", code="engine_dead")
    if request.app.state.drain.draining:
        return APIError(503, "the server is shutting down", code="draining")
    return None
