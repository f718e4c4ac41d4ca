"""`CoreService`: the engine core's side of its conversation with a client, whatever carries it.

A client sends `ipc.ToCore` messages: the server's `CoreClient` over ZeroMQ to the core's own
process (core_process.py), `LLM`'s `InprocClient` by a plain call in its own process. The
service handles each (queue requests all or none, abort, answer calls) and says what the core
has to say through `send`: a `CallResult` per call, the `Outputs` of each step. Its `turn` is
the one turn of the loop that both drivers run: one step of the core, or the wait it hints at.
So the offline API and the server share every rule but the transport.

A request (or a load call) whose adapter must first be read from disk is answered once the
read is in, or with the folder's error (a 4xx before any output): the answer waits, the loop
does not. Between two steps the core collects finished reads and calls the waiters, which
send their answers before that step's outputs. Likewise a request with an output constraint
is queued once its grammar is compiled, on a thread of its own (tens of milliseconds for a
large schema, with the GIL released): the steps of everyone else go on meanwhile.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraserve.engine.core import ipc
from loraserve.engine.core.config import EngineConfig

if TYPE_CHECKING:
    from loraserve.engine.core.core import EngineCore

logger = logging.getLogger(__name__)


def start_core(config: EngineConfig, adapters: Mapping[str, tuple[str, bool]]) -> EngineCore:
    """Load the model and the adapters named at start (name -> (folder, pinned)): every
    driver's first step. Raises what refused them (ModelLoadError, AdapterError...)."""
    from loraserve.engine.core.core import EngineCore  # torch: the front end never imports it

    core = EngineCore(config)
    for name, (path, pinned) in adapters.items():
        core.register_adapter(name, Path(path), pinned)
    return core


class CoreService:
    """Messages in, answers and step outputs out through `send`."""

    def __init__(self, core: EngineCore, send: Callable[[ipc.ToFrontEnd], None]) -> None:
        self.core = core
        self.send = send
        self._compiling: list[tuple[Future[None], ipc.AddRequest]] = []
        """Requests whose constraints are being compiled, in arrival order."""
        self._compiler: ThreadPoolExecutor | None = None

    def has_unfinished_requests(self) -> bool:
        """Requests queued in the core, or waiting for their grammars to be compiled."""
        return self.core.has_unfinished_requests() or bool(self._compiling)

    def busy(self) -> bool:
        """Requests to step or to queue, or adapter reads to collect (a step collects them)."""
        return self.has_unfinished_requests() or self.core.is_reading_adapters()

    def wait_for_compiles(self, timeout: float) -> None:
        """Block until a grammar being compiled is ready (at most `timeout` seconds)."""
        if self._compiling:
            futures = [future for future, _ in self._compiling]
            concurrent.futures.wait(futures, timeout, concurrent.futures.FIRST_COMPLETED)

    def turn(self, wait: Callable[[float], object]) -> None:
        """One turn of the loop: the requests whose grammars are compiled queued, then a step
        (its outputs sent as one message), or a wait for news as the core hints
        (`EngineCore.step_or_wait`; the driver says how it waits). A step that raises is an
        engine fault: it goes to the driver."""
        while self._compiling and self._compiling[0][0].done():
            self._add_now(self._compiling.pop(0)[1])
        outputs = self.core.step_or_wait(wait)
        if outputs:
            self.send(ipc.Outputs(outputs))

    def handle(self, message: ipc.AddRequest | ipc.Abort | ipc.Call) -> None:
        """Everything a client may send but `Shutdown`, which is its driver's business."""
        if isinstance(message, ipc.Abort):
            self._forget_compiling(set(message.request_ids))
            for request_id in message.request_ids:
                self.core.abort_request(request_id)
        elif isinstance(message, ipc.AddRequest):
            self._add(message)
        elif message.method == "register_adapter":
            self._register(message)
        else:
            self._answer(message.call_id, lambda: self._call(message.method, message.args))

    def _add(self, message: ipc.AddRequest) -> None:
        """Queue the request (once its constraint is compiled, if it has one); answer once it
        is queued and its adapter is ready."""
        constraints = [
            request.params.structured_outputs
            for request in message.requests
            if request.params.structured_outputs is not None
        ]
        if not constraints:
            self._add_now(message)
            return
        grammars = self.core.grammars  # built here, on the loop's thread, the first time
        if self._compiler is None:
            self._compiler = ThreadPoolExecutor(1, thread_name_prefix="loraserve-grammars")

        def compile_all() -> None:
            for constraint in constraints:
                try:
                    grammars.grammar_for(constraint)
                except Exception:  # queuing compiles it again, and answers with the error
                    continue

        self._compiling.append((self._compiler.submit(compile_all), message))

    def _forget_compiling(self, request_ids: set[str]) -> None:
        """Aborted requests leave the compiling list (a message left empty is never answered:
        its caller has gone)."""
        kept = []
        for future, message in self._compiling:
            requests = [r for r in message.requests if r.request_id not in request_ids]
            if requests:
                kept.append((future, ipc.AddRequest(message.call_id, requests)))
        self._compiling = kept

    def _add_now(self, message: ipc.AddRequest) -> None:
        """Queue the request; answer now if its adapter is ready, else once it is."""
        try:
            self.core.add_requests(message.requests)
        except Exception as error:
            self._refuse(message.call_id, error)
            return
        self._answer_when_ready(message.call_id, message.requests[0].adapter)

    def _register(self, message: ipc.Call) -> None:
        """A load call: the folder is read while the engine steps; answered once read."""
        name, path, pinned = message.args
        try:
            self.core.register_adapter(name, path, pinned, wait=False)
        except Exception as error:
            self._refuse(message.call_id, error)
            return
        self._answer_when_ready(message.call_id, name)

    def _answer_when_ready(self, call_id: int, adapter: str | None) -> None:
        def answer(error: Exception | None) -> None:
            if error is None:
                self.send(ipc.CallResult(call_id))
            else:
                self._refuse(call_id, error)

        if adapter is None or self.core.when_adapter_ready(adapter, answer):
            answer(None)

    def _call(self, method: str, args: list[Any]) -> Any:
        if method not in ipc.CALLS:
            raise ValueError(f"unknown engine call {method!r}")
        result = getattr(self.core, method)(*args)
        if method == "stats":
            return dataclasses.asdict(result)
        return result

    def _answer(self, call_id: int, work: Callable[[], Any]) -> None:
        try:
            value = work()
        except Exception as error:  # the caller's mistake (bad request, bad adapter...)
            self._refuse(call_id, error)
        else:
            self.send(ipc.CallResult(call_id, value=value))

    def _refuse(self, call_id: int, error: Exception) -> None:
        fields = ipc.error_fields(error)
        if fields[0] == "internal":  # not the caller's mistake: keep the traceback
            logger.error("engine call %d failed", call_id, exc_info=error)
        self.send(ipc.CallResult(call_id, error=fields))
