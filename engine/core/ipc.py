"""The messages between the front-end process and the engine-core process, and their wire form.

Two one-way ZeroMQ PUSH/PULL channels over Unix sockets (the front end binds both):
front end -> core carries requests, aborts and calls; core -> front end carries
one `Outputs` message per step, call results, and the start-up and failure notices.
Messages are msgspec structs encoded as MessagePack: a step of 64 requests'
outputs encodes and decodes in ~55 us, under half of pickle's time, and decodes
straight into the engine's own records (`EngineRequest`, `EngineOutput`).

A call (`Call`) names an `EngineCore` operation the front end may ask for; its
`CallResult` carries the value, or the typed error it raised (kind, message,
param) so that the front end can raise the same error for the server to map.
"""

from __future__ import annotations

from typing import Any

import msgspec

from loraserve.engine.core.outputs import EngineOutput, EngineStats
from loraserve.engine.core.request import EngineRequest
from loraserve.errors import (
    AdapterError,
    InvalidRequestError,
    LoraserveError,
    QueueFullError,
    UnknownAdapterError,
)

# -- front end -> core ------------------------------------------------------------------------


class AddRequest(msgspec.Struct, tag=True):
    """Queue the `n` completions of one request (all or none; one adapter); answered by a
    `CallResult` once they are queued and their adapter is ready (read from disk, if it had
    to be), or with the error that refused them."""

    call_id: int
    requests: list[EngineRequest]


class Abort(msgspec.Struct, tag=True):
    """Abort these engine-core requests (unknown or finished ids are ignored); no answer."""

    request_ids: list[str]


class Call(msgspec.Struct, tag=True):
    """Run `EngineCore.<method>(*args)` between two steps; answered by a `CallResult`
    (for `register_adapter`, once the folder is read: the engine steps meanwhile)."""

    call_id: int
    method: str
    args: list[Any]


class Shutdown(msgspec.Struct, tag=True):
    """Stop after the current step."""


# -- core -> front end ------------------------------------------------------------------------


class Ready(msgspec.Struct, tag=True):
    """The core has loaded the model and the adapters given at start (and pinned those
    asked)."""

    info: dict[str, Any]
    """The `RuntimeInfo`, as a dict."""


class StartupFailed(msgspec.Struct, tag=True):
    """The core could not start (bad model folder, bad adapter, no device...)."""

    kind: str
    message: str


class Outputs(msgspec.Struct, tag=True):
    """What one step produced."""

    outputs: list[EngineOutput]


class CallResult(msgspec.Struct, tag=True):
    call_id: int
    value: Any = None
    error: tuple[str, str, str | None] | None = None
    """(kind, message, param) of the error the call raised."""


class Fatal(msgspec.Struct, tag=True):
    """A step failed: the core's state can no longer be trusted and it exits."""

    message: str


ToCore = AddRequest | Abort | Call | Shutdown
ToFrontEnd = Ready | StartupFailed | Outputs | CallResult | Fatal

CALLS = {"register_adapter", "unregister_adapter", "stats", "adapter_names"}
"""The `EngineCore` operations a `Call` may name."""

_ERRORS: dict[str, type[LoraserveError]] = {
    "invalid_request": InvalidRequestError,
    "unknown_adapter": UnknownAdapterError,
    "adapter": AdapterError,
    "queue_full": QueueFullError,
}


def error_fields(error: BaseException) -> tuple[str, str, str | None]:
    """A user error as (kind, message, param), for a `CallResult`; others are `internal`."""
    for kind, error_type in _ERRORS.items():
        if type(error) is error_type:
            return kind, str(error), getattr(error, "param", None)
    if isinstance(error, LoraserveError | ValueError):
        return "invalid_request", str(error), getattr(error, "param", None)
    return "internal", f"{type(error).__name__}: {error}", None


def rebuild_error(kind: str, message: str, param: str | None) -> Exception:
    """The front end's copy of an error the core raised."""
    if kind == "invalid_request":
        return InvalidRequestError(message, param)
    error_type = _ERRORS.get(kind)
    if error_type is None:
        return RuntimeError(message)
    return error_type(message)


def stats_from(value: Any) -> EngineStats:
    """`EngineStats` from its wire form (a dict)."""
    return msgspec.convert(value, EngineStats)


class Codec:
    """Encoder and decoder of one direction's messages."""

    def __init__(self, incoming: Any) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(incoming)

    def encode(self, message: msgspec.Struct) -> bytes:
        return self._encoder.encode(message)

    def decode(self, data: bytes) -> Any:
        return self._decoder.decode(data)
