"""What the engine hands back: one `RequestOutput` per request per step it advanced."""

from __future__ import annotations

from dataclasses import dataclass, field

from loraserve.engine.sampler import TokenLogprobs


@dataclass
class CompletionOutput:
    """One generated sequence: all its tokens and text so far."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    """None while running; `stop` (EOS, a stop token or string), `length`, `abort`, or
    `error` (this request alone failed; `error` says why)."""
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended it, if any."""
    logprobs: list[TokenLogprobs] | None = None
    new_text: str = ""
    """Text added by the step that produced this output (for streaming)."""
    new_token_ids: list[int] = field(default_factory=list)
    error: str | None = None
    """Why the request failed, when `finish_reason` is `error`."""


@dataclass
class RequestOutput:
    """A request's state after a step; `text`/`token_ids`/`finish_reason` are those of
    its first (usually only) completion."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    adapter: str | None
    outputs: list[CompletionOutput]
    finished: bool = False

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason
