"""Typed errors for user mistakes; the server maps each to an OpenAI error object.

Internal invariants may `assert`; anything a user can cause (a bad request, a bad
model or adapter folder, an unknown adapter) raises one of these, with a message
that names the bad value and what was expected.
"""

from __future__ import annotations


class LoraserveError(Exception):
    """Base of every error a user can cause."""


class InvalidRequestError(LoraserveError, ValueError):
    """A request that cannot be served as asked (bad sampling values, prompt too long)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnknownAdapterError(LoraserveError, KeyError):
    """A request or call names an adapter that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelLoadError(LoraserveError, ValueError):
    """The base model folder is missing, incomplete or of an unsupported kind."""


class AdapterError(LoraserveError, ValueError):
    """A PEFT adapter folder that loraserve refuses; nothing of it was registered."""


QUEUE_FULL_RETRY_SECONDS = 1
"""Retry-After suggested to clients refused because the waiting queue is full."""


class QueueFullError(LoraserveError):
    """The waiting queue is at `max_waiting_requests`; try again later (HTTP 429)."""

    def __init__(self, message: str, retry_after_seconds: int = QUEUE_FULL_RETRY_SECONDS) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class EngineError(RuntimeError):
    """The engine failed while this request was in flight (HTTP 500)."""


class EngineDeadError(EngineError):
    """The engine-core process has stopped; nothing can run until a restart (HTTP 503)."""


class RequestFailedError(LoraserveError):
    """The engine ended this request alone (e.g. its sampling distribution broke down:
    NaN logits); the engine and every other request go on."""
