"""The engine core in its own process: nothing but steps on its GIL.

The front-end process (FastAPI, tokenizing, detokenizing, SSE) starts this process
with `spawn`; here the core loads the model and adapters, says `Ready` (or
`StartupFailed`), then loops: handle every message that has arrived, run one step
if any request is unfinished, send the step's outputs as one message. With nothing
to do it blocks on its inbox, waking every `PARENT_CHECK_MS` to exit if the
front end is gone, or to fail if a tensor-parallel rank has died. A step that raises is
an engine fault: the core sends `Fatal` and exits, and the front end fails what is in
flight and reports itself unhealthy.

The messages are handled by `CoreService` (service.py), which `LLM` uses in its own process.

One more thread shares this GIL: the adapter loader's (memory/adapter_loader.py), whose
reads run Python between their I/O and torch calls. The step gives the GIL up at each of
its torch ops; at the op's end it waits for the loader to give it back, and a thread that
waits asks for the GIL after the interpreter's switch interval. At CPython's default of 5 ms
that wait cost a 2000-adapter sweep ~5% of its throughput, so the core process switches
after `CORE_SWITCH_INTERVAL_S` (`configure_core_process`).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
import threading
import traceback
from collections.abc import Mapping
from typing import TYPE_CHECKING

import zmq

from loraserve.engine.core import ipc
from loraserve.engine.core.config import EngineConfig, serving_openmp_environment
from loraserve.engine.core.service import CoreService, start_core

if TYPE_CHECKING:
    from loraserve.engine.core.core import EngineCore

logger = logging.getLogger(__name__)

PARENT_CHECK_MS = 1000
CORE_SWITCH_INTERVAL_S = 0.0002
"""The core process's GIL switch interval (`sys.setswitchinterval`; CPython's default is
0.005): the longest the step waits for the GIL while the loader thread runs Python. In a
2000-adapter sweep (`bench.adapter_tiers`, three repeats against three at the default) it
served 74.6-77.3 req/s against 67.5-75.4."""


def spawn_engine_core(
    config: EngineConfig,
    adapters: dict[str, tuple[str, bool]],
    to_core_address: str,
    to_front_end_address: str,
    log_level: str,
) -> multiprocessing.process.BaseProcess:
    """Start the engine-core process (`spawn`, a daemon of this one) running `run_engine_core`,
    with a short OpenMP busy-wait (`serving_openmp_environment`): it shares the cores."""
    process = multiprocessing.get_context("spawn").Process(
        target=run_engine_core,
        args=(config, adapters, to_core_address, to_front_end_address, os.getpid(), log_level),
        name="loraserve-engine-core",
        daemon=True,
    )
    start_without_current_folder(process, serving_openmp_environment(os.environ))
    return process


_ENVIRONMENT_LOCK = threading.Lock()


def start_without_current_folder(
    process: multiprocessing.process.BaseProcess, environment: Mapping[str, str] | None = None
) -> None:
    """Start a `spawn` process with the current folder off its import path, and the
    variables of `environment` set in its environment (this process's is left as it was).

    `spawn` starts `python -c ...`, which puts the current folder first on sys.path, and the
    child imports the standard library (`struct`, `pickle`...) before multiprocessing gives it
    this process's path: a `struct.py` or a `kernels/` folder where `loraserve serve` was
    started would be imported in place of the real module. PYTHONSAFEPATH keeps it off.
    """
    variables = {**(environment or {}), "PYTHONSAFEPATH": "1"}
    with _ENVIRONMENT_LOCK:  # two threads starting processes would restore each other's values
        previous = {name: os.environ.get(name) for name in variables}
        os.environ.update(variables)
        try:
            process.start()
        finally:
            for name, value in previous.items():
                if value is None:
                    del os.environ[name]
                else:
                    os.environ[name] = value


def run_engine_core(
    config: EngineConfig,
    adapters: dict[str, tuple[str, bool]],
    to_core_address: str,
    to_front_end_address: str,
    parent_pid: int,
    log_level: str = "WARNING",
) -> None:
    """The process's entry point (a picklable top-level function, for `spawn`)."""
    configure_core_process()
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s (engine core): %(message)s")
    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    inbox.connect(to_core_address)
    outbox = context.socket(zmq.PUSH)
    outbox.connect(to_front_end_address)
    codec = ipc.Codec(ipc.ToCore)
    try:
        try:
            core = start_core(config, adapters)
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


def configure_core_process() -> None:
    """What the core process sets first: Ctrl-C ignored (it reaches the whole process group:
    the front end drains, then stops this process), and the GIL's switch interval."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.setswitchinterval(CORE_SWITCH_INTERVAL_S)


class CoreLoop:
    """Messages in (from the inbox socket), turns of `CoreService`, what it says out."""

    def __init__(
        self,
        core: EngineCore,
        inbox: zmq.Socket,
        outbox: zmq.Socket,
        codec: ipc.Codec,
        parent_pid: int,
    ) -> None:
        self.service = CoreService(core, self._send)
        self.inbox, self.outbox, self.codec = inbox, outbox, codec
        self.parent_pid = parent_pid
        self.stopping = False

    def run(self) -> None:
        while not self.stopping:
            try:
                self._receive(wait=not self.service.busy())
                if self.stopping or not self.service.busy():
                    continue
                self.service.turn(self._wait_for_messages)
            except Exception:
                logger.exception("engine step failed; the engine core exits")
                self._send(ipc.Fatal(traceback.format_exc(limit=20)))
                raise

    def _wait_for_messages(self, seconds: float) -> None:
        """The core's pause: over as soon as a message arrives."""
        self.inbox.poll(max(1, round(seconds * 1000)))

    def _receive(self, wait: bool) -> None:
        """Handle every message that has arrived; when `wait`, block until one does."""
        while wait and not self.inbox.poll(PARENT_CHECK_MS):
            if os.getppid() != self.parent_pid:  # the front end is gone: nobody to serve
                self.stopping = True
                return
            self.service.core.check()  # idle, a tensor-parallel rank may still die
        while not self.stopping:
            try:
                data = self.inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            message = self.codec.decode(data)
            if isinstance(message, ipc.Shutdown):
                self.stopping = True
            else:
                self.service.handle(message)

    def _send(self, message: ipc.ToFrontEnd) -> None:
        self.outbox.send(self.codec.encode(message))
