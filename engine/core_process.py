"""The engine core in its own process: nothing but steps on its GIL.

The front-end process (FastAPI, tokenizing, detokenizing, SSE) starts this process
with `spawn`; here the core loads the model and adapters, says `Ready` (or
`StartupFailed`), then loops: handle every message that has arrived, run one step
if any request is unfinished, send the step's outputs as one message. With nothing
to do it blocks on its inbox, waking every `PARENT_CHECK_MS` to exit if the
front end is gone. A step that raises is an engine fault: the core sends `Fatal`
and exits, and the front end fails what is in flight and reports itself unhealthy.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from loraserve.engine import ipc
from loraserve.engine.config import EngineConfig

if TYPE_CHECKING:
    from loraserve.engine.core import EngineCore

logger = logging.getLogger(__name__)

PARENT_CHECK_MS = 1000
IDLE_RETRY_MS = 10
"""Pause when requests wait but none could be scheduled (pages all taken), so the loop does not spin."""


def run_engine_core(
    config: EngineConfig,
    adapters: dict[str, str],
    to_core_address: str,
    to_front_end_address: str,
    parent_pid: int,
    log_level: str = "WARNING",
) -> None:
    """The process's entry point (a picklable top-level function, for `spawn`)."""
    # Ctrl-C reaches the whole process group: the front end drains, then stops this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s (engine core): %(message)s")
    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    inbox.connect(to_core_address)
    outbox = context.socket(zmq.PUSH)
    outbox.connect(to_front_end_address)
    codec = ipc.Codec(ipc.ToCore)
    try:
        try:
            from loraserve.engine.core import EngineCore  # torch: the front end never imports it

            core = EngineCore(config)
            for name, path in adapters.items():
                core.register_adapter(name, Path(path))
        except Exception as error:
            _, message, _ = ipc.error_fields(error)
            outbox.send(codec.encode(ipc.StartupFailed(type(error).__name__, message)))
            return
        outbox.send(codec.encode(ipc.Ready(dataclasses.asdict(core.info))))
        CoreLoop(core, inbox, outbox, codec, parent_pid).run()
    finally:
        outbox.close(linger=1000)  # let the last messages (Fatal, results) go out
        inbox.close(linger=0)
        context.term()


class CoreLoop:
    """Messages in, steps, outputs out."""

    def __init__(
        self,
        core: EngineCore,
        inbox: zmq.Socket,
        outbox: zmq.Socket,
        codec: ipc.Codec,
        parent_pid: int,
    ) -> None:
        self.core = core
        self.inbox, self.outbox, self.codec = inbox, outbox, codec
        self.parent_pid = parent_pid
        self.stopping = False

    def run(self) -> None:
        while not self.stopping:
            busy = self.core.has_unfinished_requests()
            self._receive(wait=not busy)
            if self.stopping or not self.core.has_unfinished_requests():
                continue
            try:
                outputs = self.core.step()
            except Exception:
                logger.exception("engine step failed; the engine core exits")
                self._send(ipc.Fatal(traceback.format_exc(limit=20)))
                raise
            if outputs:
                self._send(ipc.Outputs(outputs))
            elif self.core.scheduler.num_running() == 0:
                # Requests wait but none could be admitted: pause rather than spin.
                self.inbox.poll(IDLE_RETRY_MS)

    def _receive(self, wait: bool) -> None:
        """Handle every message that has arrived; when `wait`, block until one does."""
        while wait and not self.inbox.poll(PARENT_CHECK_MS):
            if os.getppid() != self.parent_pid:  # the front end is gone: nobody to serve
                self.stopping = True
                return
        while not self.stopping:
            try:
                data = self.inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(self.codec.decode(data))

    def _handle(self, message: Any) -> None:
        if isinstance(message, ipc.Abort):
            for request_id in message.request_ids:
                self.core.abort_request(request_id)
        elif isinstance(message, ipc.AddRequest):
            self._answer(
                message.call_id,
                lambda: self.core.add_requests(
                    message.sub_requests, message.prompt_token_ids, message.adapter
                ),
            )
        elif isinstance(message, ipc.Call):
            self._answer(message.call_id, lambda: self._call(message.method, message.args))
        elif isinstance(message, ipc.Shutdown):
            self.stopping = True

    def _call(self, method: str, args: list[Any]) -> Any:
        if method not in ipc.CALLS:
            raise ValueError(f"unknown engine call {method!r}")
        result = getattr(self.core, method)(*args)
        if method == "stats":
            return dataclasses.asdict(result)
        return None if method == "register_adapter" else result

    def _answer(self, call_id: int, work: Any) -> None:
        try:
            value = work()
        except Exception as error:  # the caller's mistake (bad request, bad adapter...)
            self._send(ipc.CallResult(call_id, error=ipc.error_fields(error)))
        else:
            self._send(ipc.CallResult(call_id, value=value))

    def _send(self, message: Any) -> None:
        self.outbox.send(self.codec.encode(message))
