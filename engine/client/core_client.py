"""`CoreClient`: the front end's transport to the engine core in its own process (vLLM's
`MPClient`; `LLM` drives an `EngineCore` in its own process instead).

It starts the core process (engine/core/core_process.py), binds the two ZeroMQ channels to it
(engine/core/ipc.py) and runs the receiver thread, which blocks on the core's channel and hands
each decoded message to the event loop: a `CallResult` completes the call that asked for
it; everything else (`Outputs`, `Fatal`) goes to `on_message`. If the core process dies,
`on_death` is called on the loop; every pending call fails and later ones fail at once
with `EngineDeadError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import zmq

from loraserve.engine.core import ipc
from loraserve.engine.core.config import EngineConfig, RuntimeInfo
from loraserve.engine.core.core_process import spawn_engine_core
from loraserve.errors import AdapterError, EngineDeadError, EngineError, ModelLoadError

RECEIVE_POLL_MS = 200
"""How often the receiver thread checks that the core process is still alive."""


class CoreClient:
    """The engine-core process and the channels to it, used from one asyncio loop."""

    def __init__(
        self,
        config: EngineConfig,
        adapters: dict[str, tuple[str, bool]],
        on_message: Callable[[Any], None],
        on_death: Callable[[str], None],
    ) -> None:
        """`adapters`: name -> (folder, pinned), read by the core at start. `on_message`
        and `on_death` are called on the event loop (`bind_loop`)."""
        self.config, self.adapters = config, adapters
        self.on_message, self.on_death = on_message, on_death
        self.dead: EngineDeadError | None = None
        self.stopping = False
        self.process: multiprocessing.process.BaseProcess | None = None
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._call_ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._startup: ipc.Ready | ipc.StartupFailed | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float) -> RuntimeInfo:
        """Launch the core process and wait until it has loaded everything; raises its
        start-up error (ModelLoadError, AdapterError, ValueError, EngineError)."""
        folder = tempfile.mkdtemp(prefix="loraserve-")
        to_core, to_front_end = f"ipc://{folder}/to-core", f"ipc://{folder}/to-front-end"
        self._context = zmq.Context()
        self._sender = self._context.socket(zmq.PUSH)
        self._sender.bind(to_core)
        self._receiver = self._context.socket(zmq.PULL)
        self._receiver.bind(to_front_end)
        self._codec = ipc.Codec(ipc.ToFrontEnd)
        log_level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        self.process = spawn_engine_core(
            self.config, self.adapters, to_core, to_front_end, log_level
        )
        self._thread = threading.Thread(
            target=self._receive, name="loraserve-receiver", daemon=True
        )
        self._thread.start()
        if not self._started.wait(timeout):
            self.shutdown(timeout=1.0)
            raise EngineError(f"the engine core did not start within {timeout:.0f} s")
        if not isinstance(self._startup, ipc.Ready):
            self.shutdown(timeout=1.0)
            raise _startup_error(self._startup)
        return RuntimeInfo(**self._startup.info)

    def shutdown(self, timeout: float) -> None:
        """Stop the core after its current step; pending calls fail with EngineDeadError."""
        if self.process is None or self.stopping:
            return
        self.stopping = True
        with contextlib.suppress(zmq.ZMQError):
            self._sender.send(self._codec.encode(ipc.Shutdown()), zmq.NOBLOCK)
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._thread.join(timeout)
        self._sender.close(linger=0)
        self._context.term()
        self.fail_calls(EngineDeadError("the engine is shutting down"))

    @property
    def is_alive(self) -> bool:
        alive = self.process is not None and self.process.is_alive()
        return self.dead is None and alive and not self.stopping

    def bind_loop(self) -> None:
        """Deliver the core's messages to the running event loop from now on."""
        self._loop = asyncio.get_running_loop()

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    # -- messages ----------------------------------------------------------------------------

    def send(self, message: Any) -> None:
        self._sender.send(self._codec.encode(message))

    async def call(self, message_for: Callable[[int], Any]) -> Any:
        """Send the message `message_for(call_id)` and wait for its `CallResult`: its value,
        or the typed error the core raised."""
        if self.dead is not None:
            raise self.dead
        call_id = next(self._call_ids)
        future = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        self.send(message_for(call_id))
        try:
            return await future
        finally:
            self._calls.pop(call_id, None)

    def fail_calls(self, error: Exception) -> None:
        """The engine is gone: every pending call and every later one fails."""
        if self.dead is None:
            self.dead = EngineDeadError(f"the engine is not running ({error})")
        for future in self._calls.values():
            if not future.done():
                future.set_exception(self.dead)

    # -- the receiver thread -----------------------------------------------------------------

    def _receive(self) -> None:
        """Decode each message from the core and hand it to the loop, until the core exits."""
        poller = zmq.Poller()
        poller.register(self._receiver, zmq.POLLIN)
        while True:
            if poller.poll(RECEIVE_POLL_MS):
                message = self._codec.decode(self._receiver.recv())
                if isinstance(message, ipc.Ready | ipc.StartupFailed):
                    self._startup = message
                    self._started.set()
                else:
                    self._to_loop(self._on_message, message)
            elif self.process is not None and not self.process.is_alive():
                break
        self._receiver.close(linger=0)
        if not self._started.is_set():  # died while loading
            self._startup = ipc.StartupFailed(
                "EngineError", "the engine core exited while starting"
            )
            self._started.set()
        elif not self.stopping:
            code = self.process.exitcode if self.process is not None else None
            self._to_loop(self.on_death, f"the engine core process exited (code {code})")

    def _to_loop(self, callback: Callable[[Any], None], argument: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening
            loop.call_soon_threadsafe(callback, argument)

    def _on_message(self, message: Any) -> None:
        if not isinstance(message, ipc.CallResult):
            self.on_message(message)
            return
        future = self._calls.get(message.call_id)
        if future is not None and not future.done():
            if message.error is not None:
                future.set_exception(ipc.rebuild_error(*message.error))
            else:
                future.set_result(message.value)


def _startup_error(message: ipc.StartupFailed | None) -> Exception:
    """The error to raise in the front end for a core that could not start."""
    if message is None:
        return EngineError("the engine core did not start")
    if message.kind == "ModelLoadError":
        return ModelLoadError(message.message)
    if message.kind == "AdapterError":
        return AdapterError(message.message)
    if message.kind == "EngineError":
        return EngineError(message.message)
    return ValueError(message.message)
