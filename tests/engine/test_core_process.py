"""The engine-core process's loop, in this process over in-process sockets: calls are answered
with the core's typed errors, a failing step sends `Fatal` and stops the loop."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import pytest
import zmq

from loraserve.engine.core import ipc
from loraserve.engine.core.core_process import (
    CORE_SWITCH_INTERVAL_S,
    CoreLoop,
    configure_core_process,
)
from loraserve.engine.core.request import EngineRequest
from loraserve.engine.core.sampling_params import SamplingParams
from loraserve.errors import InvalidRequestError, UnknownAdapterError


class BrokenCore:
    """A core whose step raises once a request is in."""

    def __init__(self) -> None:
        self.requests: list[str] = []

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def add_requests(self, requests: list[EngineRequest]) -> None:
        if requests[0].adapter == "nope":
            raise UnknownAdapterError("adapter 'nope' is not registered")
        if not requests[0].prompt_token_ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        self.requests += [request.request_id for request in requests]

    def when_adapter_ready(self, name: str, waiter: Any) -> bool:
        return True

    def is_reading_adapters(self) -> bool:
        return False

    def check(self) -> None:
        pass

    def step_or_wait(self, wait: Any) -> list[Any]:
        raise RuntimeError("a kernel failed")


@pytest.fixture
def channel():
    context = zmq.Context()
    to_core, to_front = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    to_core.bind("inproc://to-core")
    to_front.bind("inproc://to-front")
    inbox, outbox = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    inbox.connect("inproc://to-core")
    outbox.connect("inproc://to-front")
    yield to_core, to_front, inbox, outbox
    for socket in (to_core, to_front, inbox, outbox):
        socket.close(linger=0)
    context.term()


def test_calls_are_answered_and_a_failing_step_is_fatal(channel) -> None:
    to_core, to_front, inbox, outbox = channel
    front_end, core_side = ipc.Codec(ipc.ToFrontEnd), ipc.Codec(ipc.ToCore)
    params = SamplingParams(max_tokens=2)
    for message in (
        ipc.AddRequest(1, [EngineRequest("a-0", [3], params, "nope")]),
        ipc.AddRequest(2, [EngineRequest("b-0", [], params)]),
        ipc.AddRequest(3, [EngineRequest("c-0", [3], params)]),
    ):
        to_core.send(front_end.encode(message))
    loop = CoreLoop(BrokenCore(), inbox, outbox, core_side, os.getppid())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="a kernel failed"):
        loop.run()
    replies = [front_end.decode(to_front.recv()) for _ in range(4)]
    assert replies[0] == ipc.CallResult(
        1, error=("unknown_adapter", "adapter 'nope' is not registered", None)
    )
    assert replies[1] == ipc.CallResult(
        2, error=("invalid_request", "the prompt is empty", "prompt")
    )
    assert replies[2] == ipc.CallResult(3)
    assert isinstance(replies[3], ipc.Fatal) and "a kernel failed" in replies[3].message
    rebuilt = ipc.rebuild_error(*replies[1].error)
    assert isinstance(rebuilt, InvalidRequestError) and rebuilt.param == "prompt"


def test_the_core_process_gives_the_step_the_gil_back_within_a_fraction_of_a_millisecond():
    """The loader thread shares the core's GIL: the step waits at most the switch interval
    for it after each torch op (CPython's default, 5 ms, cost a 2000-adapter sweep ~5%)."""
    interval, handler = sys.getswitchinterval(), signal.getsignal(signal.SIGINT)
    try:
        configure_core_process()
        assert sys.getswitchinterval() == pytest.approx(CORE_SWITCH_INTERVAL_S)
        assert CORE_SWITCH_INTERVAL_S <= 0.0005
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        sys.setswitchinterval(interval)
        signal.signal(signal.SIGINT, handler)
