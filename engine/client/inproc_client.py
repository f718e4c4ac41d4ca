"""`InprocClient`: the engine core in this process, for `LLM` (vLLM's `InprocClient`; the
server's is `CoreClient`, to a process of its own).

The same messages as over `CoreClient` (engine/core/ipc.py), handled by the same
`CoreService` (engine/core/service.py) with nothing between: `send` hands a message to the
service at once; `run_turn` runs one turn of the loop the core process runs, waiting (when
the core hints so) on adapter reads or grammar compiles instead of on a socket; whatever the
core says goes to `on_message`, in order, before the call that made it returns.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from loraserve.engine.core import ipc
from loraserve.engine.core.config import EngineConfig
from loraserve.engine.core.service import CoreService, start_core

if TYPE_CHECKING:
    from loraserve.engine.core.core import EngineCore


class InprocClient:
    """An `EngineCore` in this process, driven through `CoreService`'s messages."""

    def __init__(
        self,
        config: EngineConfig,
        adapters: Mapping[str, tuple[str, bool]],
        on_message: Callable[[ipc.ToFrontEnd], None],
    ) -> None:
        """Load the model and `adapters` (name -> (folder, pinned)) now; raises what refused
        them. `on_message` receives every `CallResult` and `Outputs`."""
        self.core: EngineCore = start_core(config, adapters)
        self.service = CoreService(self.core, on_message)
        self._call_ids = itertools.count()

    def send(self, message: ipc.AddRequest | ipc.Abort | ipc.Call) -> None:
        self.service.handle(message)

    def next_call_id(self) -> int:
        return next(self._call_ids)

    def has_unfinished_requests(self) -> bool:
        return self.service.has_unfinished_requests()

    def run_turn(self) -> None:
        """One turn of the core's loop: a step, or a short wait for adapter reads or for
        grammars being compiled (the core process waits on its inbox instead)."""
        self.service.turn(self._wait)

    def _wait(self, seconds: float) -> None:
        if self.core.is_reading_adapters():
            self.core.wait_for_adapter_reads(seconds)
        else:
            self.service.wait_for_compiles(seconds)
