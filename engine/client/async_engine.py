"""`AsyncEngine`: the front end's handle on the engine core, which runs in its own process.

The event loop and the engine's step never share a GIL: the core runs in a child process,
reached through `CoreClient` (engine/client/core_client.py: the process, the ZeroMQ channels, the
receiver thread). This side keeps, on the event loop, the output processor (fan-out,
detokenizing, stop strings) and the streams of running requests. Requests are sent as
`EngineRequest`s of token ids; what comes back is one message per step.

A request the core failed alone (`finish_reason` `error`: its sampling broke down)
raises `RequestFailedError` in its own stream, and its other completions stop;
nothing else notices. If the core process dies or reports a fault, every request in
flight fails with `EngineError`, later calls fail at once with `EngineDeadError`, and
`is_healthy` turns False (the server's /health reports it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from loraserve.engine.client.adapter_names import AdapterNames, adapters_read_at_start
from loraserve.engine.client.core_client import CoreClient
from loraserve.engine.client.output_processor import OutputProcessor
from loraserve.engine.core import ipc
from loraserve.engine.core.config import EngineConfig, RuntimeInfo, with_serving_threads
from loraserve.engine.core.outputs import CompletionDelta, EngineStats
from loraserve.engine.core.request import EngineRequest
from loraserve.errors import (
    EngineDeadError,
    EngineError,
    InvalidRequestError,
    RequestFailedError,
)
from loraserve.models.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_SECONDS = 600.0  # loading a large model and many adapters takes a while
SHUTDOWN_TIMEOUT_SECONDS = 10.0


class RequestStream:
    """The deltas of one request's `n` completions, step by step, until all finish.

    Each item is a list of `CompletionDelta`s (those that arrived since the last
    item; a consumer slower than the engine gets several at once). Use it as
    `async with stream: async for deltas in stream: ...`; leaving the block early
    (error, cancellation, client gone) aborts what is unfinished.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, num_completions: int) -> None:
        self._engine = engine
        self.request_id = request_id
        self.queue: asyncio.Queue[CompletionDelta | BaseException] = asyncio.Queue()
        self._num_unfinished = num_completions

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> list[CompletionDelta]:
        if self._num_unfinished == 0:
            raise StopAsyncIteration
        items = [await self.queue.get()]
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        deltas = []
        for item in items:
            if isinstance(item, BaseException):
                self._num_unfinished = 0  # the engine forgot this request already
                raise item
            self._num_unfinished -= item.finished
            deltas.append(item)
        return deltas

    def abort(self) -> None:
        """Stop every unfinished completion now; safe to call more than once."""
        if self._num_unfinished:
            self._num_unfinished = 0
            self._engine.abort(self.request_id)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Synchronous on purpose: this runs inside a cancelled task too.
        self.abort()


@dataclass
class _Running:
    stream: RequestStream
    sub_ids: list[str]
    num_unfinished: int


class AsyncEngine:
    """The engine core in a child process, used from asyncio: requests in, streams out."""

    def __init__(
        self,
        config: EngineConfig,
        adapters: Mapping[str, str | Path] | None = None,
        pinned: Collection[str] = (),
        adapter_dir: str | None = None,
    ):
        """Nothing starts yet: `start()` launches the core with the model and `adapters`
        (name -> PEFT folder, read at start; those named in `pinned`, which may be in
        `adapter_dir`, are read at start and kept in the pool); the other folders of
        `adapter_dir` are listed, each read when a request first names it. An error in
        `start()` means the server must not start; ValueError here for a name given twice
        or a pin of nothing."""
        self.config = with_serving_threads(config)
        self.names = AdapterNames(adapter_dir)
        """The adapters served, by name (registered, or in the adapter dir)."""
        at_start = adapters_read_at_start(adapters or {}, pinned, self.names.listed())
        self.client = CoreClient(self.config, at_start, self._on_message, self._on_death)
        self.tokenizer = Tokenizer.from_folder(config.model.model)
        self.processor = OutputProcessor(self.tokenizer, self._abort_in_core)
        self.info: RuntimeInfo | None = None
        self._running: dict[str, _Running] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
        """Launch the core process and wait until it has loaded everything (idempotent).

        Raises the core's start-up error (ModelLoadError, AdapterError, ValueError...)."""
        if self.client.process is not None:
            return
        self.info = self.client.start(timeout)
        self.names.registered = {
            name: Path(path) for name, (path, _) in self.client.adapters.items()
        }

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT_SECONDS) -> None:
        """Stop the core after its current step; requests in flight fail with EngineDeadError."""
        if self.client.process is None or self.client.stopping:
            return
        self.client.shutdown(timeout)
        self._fail_all(EngineDeadError("the engine is shutting down"))

    @property
    def is_healthy(self) -> bool:
        return self.client.is_alive

    @property
    def adapters(self) -> dict[str, Path]:
        """Every adapter served, name -> folder (registered, and the adapter dir's)."""
        return self.names.all()

    # -- requests ----------------------------------------------------------------------------

    async def add_request(self, request: EngineRequest) -> RequestStream:
        """`add_requests` of one request."""
        return (await self.add_requests([request]))[0]

    async def add_requests(self, requests: list[EngineRequest]) -> list[RequestStream]:
        """Queue requests of one adapter (the `params.n` completions of each), all or none
        in one message, so the core weighs them against its waiting queue at once; raises
        what the core refuses (InvalidRequestError, UnknownAdapterError, QueueFullError,
        AdapterError for an adapter folder that cannot be read) before any output exists.
        Returns once they are queued and their adapter is ready (read from disk, if not)."""
        self._bind_loop()
        ids = [request.request_id for request in requests]
        if len(set(ids)) < len(ids) or any(request_id in self._running for request_id in ids):
            raise InvalidRequestError(f"request ids {ids!r} are already in use")
        for request in requests:
            self._check_token_ids(request.prompt_token_ids)
        streams, subs = [], []
        for request in requests:
            completions = self.processor.add_request(request)
            stream = RequestStream(self, request.request_id, len(completions))
            sub_ids = [sub.request_id for sub in completions]
            self._running[request.request_id] = _Running(stream, sub_ids, len(completions))
            streams.append(stream)
            subs += completions
        try:
            await self.client.call(lambda call_id: ipc.AddRequest(call_id, subs))
        except BaseException as error:
            for request_id in ids:
                self._running.pop(request_id, None)
            self.processor.forget(sub.request_id for sub in subs)
            if isinstance(error, asyncio.CancelledError):  # it may have been added just before
                self.client.send(ipc.Abort([sub.request_id for sub in subs]))
            raise
        return streams

    def _check_token_ids(self, prompt_token_ids: list[int]) -> None:
        """Ids within the vocabulary, looked at only once the length is known to fit: the
        core checks again, but an id beyond 64 bits could not even be sent to it."""
        assert self.info is not None
        limit, vocab = self.info.max_model_len, self.info.vocab_size
        if len(prompt_token_ids) >= limit:
            return  # the core refuses it with the lengths in its message
        if prompt_token_ids and not (min(prompt_token_ids) >= 0 and max(prompt_token_ids) < vocab):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", "prompt")

    async def generate(self, request: EngineRequest) -> AsyncIterator[CompletionDelta]:
        """The deltas of one request; closing or cancelling the iterator aborts it."""
        stream = await self.add_request(request)
        async with stream:
            async for deltas in stream:
                for delta in deltas:
                    yield delta

    def abort(self, *request_ids: str) -> None:
        """Abort requests by id; unknown or finished ids are ignored."""
        sub_ids: list[str] = []
        for request_id in request_ids:
            running = self._running.pop(request_id, None)
            if running is not None:
                sub_ids += running.sub_ids
        self.processor.forget(sub_ids)
        if sub_ids and self.client.dead is None:
            self.client.send(ipc.Abort(sub_ids))

    # -- admin calls, run by the core between two steps --------------------------------------

    async def register_adapter(self, name: str, path: str | Path, pinned: bool = False) -> None:
        """Load a PEFT folder, kept in the pool if `pinned` (AdapterError if refused or the
        name is taken). The core reads it while it steps; this returns once it is read."""
        await self._request("register_adapter", name, str(path), pinned)
        self.names.registered[name] = Path(path)

    async def unregister_adapter(self, name: str) -> None:
        """Forget an adapter: new requests for it are refused at once, requests in flight
        finish, then the core forgets it (UnknownAdapterError if not registered)."""
        await self._request("unregister_adapter", name)
        self.names.registered.pop(name, None)

    async def stats(self) -> EngineStats:
        """Counts for /metrics; an empty picture once the engine is dead."""
        if self.client.dead is not None:
            return EngineStats()
        return ipc.stats_from(await self._request("stats"))

    async def _request(self, method: str, *args: Any) -> Any:
        self._bind_loop()
        return await self.client.call(lambda call_id: ipc.Call(call_id, method, list(args)))

    # -- what the core sends -----------------------------------------------------------------

    def _bind_loop(self) -> None:
        """Deliver the core's messages to the running event loop: the first one used (or,
        once it is closed, the next); using the engine from two loops at once is a bug."""
        if self.client.process is None:
            self.start()
        loop, bound = asyncio.get_running_loop(), self.client.loop
        if bound is not loop:
            if bound is not None and not bound.is_closed() and self._running:
                raise RuntimeError("this AsyncEngine serves another event loop")
            self.client.bind_loop()

    def _on_message(self, message: Any) -> None:
        if isinstance(message, ipc.Outputs):
            self._on_outputs(message)
        elif isinstance(message, ipc.Fatal):
            logger.error("the engine core failed:\n%s", message.message)
            self._on_death("the engine failed")

    def _on_outputs(self, message: ipc.Outputs) -> None:
        for request_id, delta in self.processor.process(message.outputs):
            running = self._running.get(request_id)
            if running is None:
                continue
            if delta.error is not None:  # this request failed alone: so do its other completions
                running.stream.queue.put_nowait(RequestFailedError(delta.error))
                self.abort(request_id)
                continue
            running.stream.queue.put_nowait(delta)
            if delta.finished:
                running.num_unfinished -= 1
                if running.num_unfinished == 0:
                    del self._running[request_id]

    def _abort_in_core(self, sub_ids: list[str]) -> None:
        self.client.send(ipc.Abort(sub_ids))

    def _on_death(self, reason: str) -> None:
        self._fail_all(EngineError(reason))

    def _fail_all(self, error: Exception) -> None:
        self.client.fail_calls(error)
        for running in self._running.values():
            running.stream.queue.put_nowait(error)
        self._running.clear()
