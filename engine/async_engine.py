"""`AsyncEngine`: the synchronous engine on its own thread, bridged to asyncio.

`LLMEngine` is not thread-safe, so exactly one thread (the engine thread) ever
touches it. The event loop talks to that thread through a command queue guarded
by a condition variable: adding a request, aborting one, registering an adapter,
reading statistics are all commands. The thread runs the commands that arrived,
then one engine step, and sleeps on the condition when it has nothing to do.
Outputs travel back to each request's `asyncio.Queue` with
`loop.call_soon_threadsafe`, so the event loop never waits on model work.

A request the engine failed alone (`finish_reason` `error`: its sampling broke
down) raises `RequestFailedError` in its own stream; nothing else notices. If a
step raises, the engine state can no longer be trusted: every request in flight
fails with `EngineError`, later calls fail at once with `EngineDeadError` and
`is_healthy` turns False (the server's /health reports it).

A request's `n` completions are `n` engine requests: they count as `n` against
`max_waiting_requests`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from loraserve.engine.sampling_params import per_completion
from loraserve.errors import (
    InvalidRequestError,
    LoraserveError,
    RequestFailedError,
    UnknownAdapterError,
)

if TYPE_CHECKING:
    from loraserve.engine.engine import LLMEngine
    from loraserve.engine.outputs import RequestOutput
    from loraserve.engine.sampling_params import SamplingParams

T = TypeVar("T")
logger = logging.getLogger(__name__)

IDLE_RETRY_SECONDS = 0.01
"""Pause when requests wait but nothing could be scheduled, so the thread does not spin."""
QUEUE_FULL_RETRY_SECONDS = 1
"""Retry-After suggested to clients refused because the waiting queue is full."""


class EngineError(RuntimeError):
    """The engine failed while this request was in flight (HTTP 500)."""


class EngineDeadError(EngineError):
    """The engine thread has stopped; nothing can run until a restart (HTTP 503)."""


class QueueFullError(LoraserveError):
    """The waiting queue is at `max_waiting_requests`; try again later (HTTP 429)."""

    def __init__(self, message: str, retry_after_seconds: int = QUEUE_FULL_RETRY_SECONDS) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


@dataclass(frozen=True)
class EngineStats:
    """A consistent picture of the engine, taken on the engine thread (for /metrics)."""

    num_running: int = 0
    num_waiting: int = 0
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    num_total_pages: int = 0
    num_kv_pages: int = 0
    num_adapter_pages: int = 0
    num_free_pages: int = 0
    num_pinned_adapter_pages: int = 0
    """Pages of resident adapters that running requests use (not reclaimable now)."""
    resident_adapters: tuple[str, ...] = ()
    num_adapter_loads: int = 0
    num_adapter_evictions: int = 0
    num_preemptions: int = 0
    new_adapter_load_seconds: tuple[float, ...] = ()
    """Load latencies recorded since the previous `stats()` call (each reported once)."""


@dataclass
class _Command:
    """Work for the engine thread; its result or error goes to `future` on `loop`."""

    run: Callable[[], Any]
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[Any] | None = None


@dataclass
class _Sink:
    """Where the engine thread delivers one sub-request's outputs."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]
    index: int
    parent_id: str


class RequestStream:
    """Outputs of one request, step by step, until all its `n` completions finish.

    Each item is a `RequestOutput` holding one completion (its `index` says which)
    with cumulative `text`/`token_ids` and this step's `new_text`/`new_token_ids`.
    Use it as `async with stream: async for output in stream: ...`; leaving the
    block early (error, cancellation, client gone) aborts what is unfinished.
    """

    def __init__(self, engine: AsyncEngine, sub_ids: list[str], queue: asyncio.Queue[Any]) -> None:
        self._engine = engine
        self._sub_ids = sub_ids
        self._queue = queue
        self._num_unfinished = len(sub_ids)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._num_unfinished == 0:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            # One completion failed (or the engine died): the request has failed, so its
            # other completions stop too; ids the engine already forgot are ignored.
            self.abort()
            raise item
        if item.finished:
            self._num_unfinished -= 1
        return item  # type: ignore[no-any-return]

    def abort(self) -> None:
        """Stop every unfinished completion now; safe to call more than once."""
        if self._num_unfinished:
            self._num_unfinished = 0
            self._engine.abort(*self._sub_ids)

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


class AsyncEngine:
    """An `LLMEngine` driven by its own thread, used from asyncio."""

    def __init__(self, engine: LLMEngine, adapters: Mapping[str, str | Path] | None = None) -> None:
        """Wrap `engine` and register `adapters` (name -> PEFT folder) before the thread
        starts; an AdapterError here means the server must not start."""
        self.engine = engine
        self._adapters: dict[str, Path] = {}
        for name, path in (adapters or {}).items():
            engine.register_adapter(name, path)
            self._adapters[name] = Path(path)
        self._wakeup = threading.Condition()
        self._commands: list[_Command] = []
        self._sinks: dict[str, _Sink] = {}  # engine thread only: sub-request id -> sink
        self._stopping = False
        self._dead: EngineDeadError | None = None
        self._last_stats = EngineStats()
        self._thread = threading.Thread(target=self._run, name="loraserve-engine", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the thread after its current step; requests in flight fail with EngineDeadError."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def is_healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    @property
    def adapters(self) -> dict[str, Path]:
        """Registered adapters, name -> folder (a copy)."""
        return dict(self._adapters)

    def has_adapter(self, name: str) -> bool:
        """Whether `name` is registered (no copy: this runs on every request)."""
        return name in self._adapters

    # -- requests ----------------------------------------------------------------------------

    async def add_request(
        self,
        request_id: str,
        prompt: str | None,
        params: SamplingParams,
        adapter: str | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> RequestStream:
        """Queue a request (its `params.n` completions); raises what `LLMEngine.add_request`
        raises, or QueueFullError, before any output exists."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        sub_ids = [request_id] if params.n == 1 else [f"{request_id}-{i}" for i in range(params.n)]

        def add() -> None:
            self._add_on_thread(
                sub_ids,
                prompt,
                params,
                adapter,
                prompt_token_ids,
                _Sink(loop, queue, 0, request_id),
            )

        try:
            await self._submit(add, loop)
        except asyncio.CancelledError:
            self.abort(*sub_ids)  # it may have been added just before we were cancelled
            raise
        return RequestStream(self, sub_ids, queue)

    async def generate(
        self,
        request_id: str,
        prompt: str | None,
        params: SamplingParams,
        adapter: str | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """The outputs of one request; closing or cancelling the iterator aborts it."""
        stream = await self.add_request(request_id, prompt, params, adapter, prompt_token_ids)
        async with stream:
            async for output in stream:
                yield output

    def abort(self, *request_ids: str) -> None:
        """Abort requests by (sub-)request id; unknown or finished ids are ignored."""

        def abort() -> None:
            for request_id in request_ids:
                self._sinks.pop(request_id, None)
                self.engine.abort_request(request_id)

        if self._dead is None:
            self._enqueue(_Command(abort))

    # -- admin calls, run on the engine thread -----------------------------------------------

    async def call(self, function: Callable[[LLMEngine], T]) -> T:
        """Run `function(engine)` on the engine thread and return its result."""
        return await self._submit(lambda: function(self.engine), asyncio.get_running_loop())

    async def register_adapter(self, name: str, path: str | Path) -> None:
        """Load a PEFT folder (AdapterError if refused; InvalidRequestError if the name is taken)."""

        def register(engine: LLMEngine) -> None:
            if name in self._adapters:
                raise InvalidRequestError(f"adapter {name!r} is already registered", "lora_name")
            engine.register_adapter(name, path)
            self._adapters[name] = Path(path)

        await self.call(register)

    async def unregister_adapter(self, name: str) -> None:
        """Forget an adapter (UnknownAdapterError; InvalidRequestError while requests use it)."""

        def unregister(engine: LLMEngine) -> None:
            if name not in self._adapters:
                raise UnknownAdapterError(f"adapter {name!r} is not registered")
            engine.unregister_adapter(name)
            del self._adapters[name]

        await self.call(unregister)

    async def stats(self) -> EngineStats:
        """Counts for /metrics; the last known ones once the engine is dead."""
        if self._dead is not None:
            return self._last_stats
        with contextlib.suppress(EngineError):  # if it died meanwhile, report what we saw last
            self._last_stats = await self.call(self._collect_stats)
        return self._last_stats

    # -- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while (commands := self._next_commands()) is not None:
                for command in commands:
                    self._execute(command)
                if self.engine.has_unfinished_requests():
                    self._step()
        except BaseException as error:  # the engine's state is unknown now: stop serving
            logger.exception("engine step failed; failing every request in flight")
            self._die(EngineError(f"the engine failed: {error!r}"))
            return
        self._die(EngineError("the engine is shutting down"))

    def _next_commands(self) -> list[_Command] | None:
        """The commands queued so far, sleeping while there is nothing at all to do;
        None when asked to stop."""
        with self._wakeup:
            while not (self._commands or self._stopping or self.engine.has_unfinished_requests()):
                self._wakeup.wait()
            if self._stopping:
                return None
            commands, self._commands = self._commands, []
        return commands

    def _step(self) -> None:
        outputs = self.engine.step()
        for output in outputs:
            sink = self._sinks.get(output.request_id)
            if sink is None:
                continue  # aborted after this step was scheduled
            if output.finished:
                del self._sinks[output.request_id]
            error = output.outputs[0].error
            _deliver(sink, _snapshot(output, sink) if error is None else RequestFailedError(error))
        if not outputs and self.engine.scheduler.num_running() == 0:
            # Requests wait but none could be admitted (pages are all taken);
            # pause instead of spinning until a command or a retry changes that.
            with self._wakeup:
                if not self._commands and not self._stopping:
                    self._wakeup.wait(IDLE_RETRY_SECONDS)

    def _add_on_thread(
        self,
        sub_ids: list[str],
        prompt: str | None,
        params: SamplingParams,
        adapter: str | None,
        prompt_token_ids: list[int] | None,
        sink: _Sink,
    ) -> None:
        """Add every sub-request of one request, or none of them."""
        scheduler = self.engine.scheduler
        if scheduler.is_full(len(sub_ids)):
            raise QueueFullError(
                f"the server has {scheduler.num_waiting()} requests waiting and room for "
                f"{scheduler.config.max_waiting_requests}; this one would add {len(sub_ids)} "
                "(one per completion); retry later"
            )
        added: list[str] = []
        try:
            for index, (sub_id, sub_params) in enumerate(
                zip(sub_ids, per_completion(params), strict=True)
            ):
                self.engine.add_request(sub_id, prompt, sub_params, adapter, prompt_token_ids)
                added.append(sub_id)
                self._sinks[sub_id] = dataclasses.replace(sink, index=index)
        except BaseException:
            for sub_id in added:
                self._sinks.pop(sub_id, None)
                self.engine.abort_request(sub_id)
            raise

    def _collect_stats(self, engine: LLMEngine) -> EngineStats:
        memory, scheduler = engine.memory, engine.scheduler
        resident = tuple(memory.resident_adapters())
        new_loads = tuple(memory.stats.drain_load_seconds())
        return EngineStats(
            num_running=scheduler.num_running(),
            num_waiting=scheduler.num_waiting(),
            running_adapters=tuple(scheduler.running_adapters()),
            waiting_adapters=tuple(scheduler.waiting_adapters()),
            num_total_pages=memory.num_total_pages,
            num_kv_pages=memory.num_kv_pages,
            num_adapter_pages=memory.num_adapter_pages,
            num_free_pages=memory.num_free_pages,
            num_pinned_adapter_pages=sum(
                engine.store.get(name).num_pages for name in resident if memory.is_in_use(name)
            ),
            resident_adapters=resident,
            num_adapter_loads=memory.stats.adapter_loads,
            num_adapter_evictions=memory.stats.adapter_evictions,
            num_preemptions=engine.num_preemptions,
            new_adapter_load_seconds=new_loads,
        )

    # -- plumbing ----------------------------------------------------------------------------

    def _submit(self, run: Callable[[], T], loop: asyncio.AbstractEventLoop) -> asyncio.Future[T]:
        future: asyncio.Future[T] = loop.create_future()
        self._enqueue(_Command(run, loop, future))
        return future

    def _enqueue(self, command: _Command) -> None:
        with self._wakeup:
            if self._dead is not None:
                _resolve(command, error=self._dead)
                return
            self._commands.append(command)
            self._wakeup.notify()

    def _execute(self, command: _Command) -> None:
        try:
            result = command.run()
        except Exception as error:  # the caller's error (bad request, bad adapter...)
            _resolve(command, error=error)
        else:
            _resolve(command, result=result)

    def _die(self, error: EngineError) -> None:
        """Fail everything in flight and refuse what comes later."""
        with self._wakeup:
            self._dead = EngineDeadError(f"the engine is not running ({error})")
            commands, self._commands = self._commands, []
        for command in commands:
            _resolve(command, error=self._dead)
        for sink in self._sinks.values():
            _deliver(sink, error)
        self._sinks.clear()


def _snapshot(output: RequestOutput, sink: _Sink) -> RequestOutput:
    """A copy the event loop may read while the engine keeps appending to the original."""
    completion = output.outputs[0]
    copy = dataclasses.replace(
        completion,
        index=sink.index,
        token_ids=list(completion.token_ids),
        new_token_ids=list(completion.new_token_ids),
        logprobs=None if completion.logprobs is None else list(completion.logprobs),
    )
    return dataclasses.replace(output, request_id=sink.parent_id, outputs=[copy])


def _deliver(sink: _Sink, item: Any) -> None:
    with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening
        sink.loop.call_soon_threadsafe(sink.queue.put_nowait, item)


def _resolve(command: _Command, result: Any = None, error: BaseException | None = None) -> None:
    if command.loop is None or command.future is None:
        if error is not None and not isinstance(error, EngineError):
            raise error  # a fire-and-forget command (abort) failed: the engine is broken
        return
    future = command.future

    def settle() -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is waiting
        command.loop.call_soon_threadsafe(settle)
