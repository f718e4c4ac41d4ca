"""What crosses from the engine core to the front end, and what the front end hands out.

Plain records (no torch): the core's outputs travel to the front-end process as
they are (engine/core/ipc.py serializes them).

- `EngineOutput`: one request's progress in one step, from the core: the token(s)
  it gained, their logprobs, and how it finished. Deltas only: nothing the front
  end already has is sent again.
- `CompletionDelta`: the same, turned into text by the front end's output processor
  (detokenized, stop strings applied), for a stream of one of the request's `n`.
- `CompletionOutput` / `RequestOutput`: whole results, as `LLM.generate` returns them.
- `EngineStats`: a consistent picture of the core for /metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# An adapter's two load steps, as the `transition` label of vllm:lora_adapter_load_seconds
# names them (the values the llm-d router's residency scorer, llm-d-router PR #2792, reads).
LOAD_TRANSITION = "load"
"""Its folder read from disk into host RAM."""
ACTIVATE_TRANSITION = "activate"
"""Its host-RAM copy brought into the pool, where requests can use it."""


@dataclass
class TokenLogprobs:
    """Logprobs of one generated token, from the raw model logits."""

    token_id: int
    logprob: float
    rank: int
    """1 + the number of tokens whose logprob is strictly higher than the chosen one's."""
    top_logprobs: list[tuple[int, float]]
    """The `logprobs` most likely (token id, logprob), most likely first."""


@dataclass
class EngineOutput:
    """A request's progress in one step, as the engine core reports it."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    """None while running; `stop` (EOS or a stop token), `length`, `abort` or `error`."""
    stop_reason: int | None = None
    """The stop token id that ended it, if one did (EOS is not reported, as in vLLM)."""
    error: str | None = None
    """With finish_reason `error`: why this request failed (the others carry on)."""
    stopped_on_token: bool = False
    """The last new token is the stop token (EOS or one of `stop_token_ids`) that ended the
    request: as in vLLM, its text is not part of the output unless
    `include_stop_str_in_output`."""
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """With the first output of a request with `prompt_logprobs`: one entry per prompt token
    (None for the first, which nothing predicts)."""
    queue_seconds: float | None = None
    """With a request's first token: seconds from being queued in the core to its first
    scheduled step (vLLM's `request_queue_time_seconds`)."""
    prefill_seconds: float | None = None
    """With a request's first token: seconds from its first scheduled step to that token."""


@dataclass
class CompletionDelta:
    """What one of a request's `n` completions gained in one step, as text."""

    index: int
    """Which completion (0 .. n-1)."""
    new_text: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None
    finish_reason: str | None
    stop_reason: str | int | None
    """The stop string or stop token id that ended it, if any."""
    num_tokens: int
    """Tokens this completion has generated so far (for usage)."""
    error: str | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """With a completion's first delta, when its request asked for prompt logprobs."""
    queue_seconds: float | None = None
    """With a completion's first token: its time queued in the engine core."""
    prefill_seconds: float | None = None
    """With a completion's first token: from its first scheduled step to that token."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class CompletionOutput:
    """One generated sequence, whole."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    """`stop` (EOS, a stop token or string), `length`, `abort`, or `error` (this request
    alone failed; `error` says why)."""
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended it, if any."""
    logprobs: list[TokenLogprobs] | None = None
    error: str | None = None
    """Why the request failed, when `finish_reason` is `error`."""
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """One entry per prompt token (None for the first), when asked for."""

    def add(self, delta: CompletionDelta) -> None:
        """Append a step's delta."""
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        self.text += delta.new_text
        self.token_ids += delta.new_token_ids
        if delta.new_logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.new_logprobs
        self.finish_reason = delta.finish_reason
        self.stop_reason = delta.stop_reason
        self.error = delta.error


@dataclass
class RequestOutput:
    """A finished request; `text`/`token_ids`/`finish_reason` are its first completion's."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    adapter: str | None
    outputs: list[CompletionOutput]
    finished: bool = True

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


@dataclass(frozen=True)
class EngineStats:
    """A consistent picture of the engine core between two steps (for /metrics)."""

    num_running: int = 0
    num_waiting: int = 0
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    num_total_pages: int = 0
    num_kv_pages: int = 0
    """KV pages running requests hold."""
    num_cached_kv_pages: int = 0
    """Cached KV blocks no running request reads (prefix caching; reclaimable)."""
    num_adapter_pages: int = 0
    num_free_pages: int = 0
    num_pinned_adapter_pages: int = 0
    """Pages of resident adapters that running requests use or that are pinned (not
    reclaimable now)."""
    loaded_adapters: tuple[tuple[str, str, bool, int], ...] = ()
    """(name, level, pinned, rank) of every adapter in the pool (level `gpu`) or only in
    host RAM (`cpu`), sorted by name."""
    num_host_adapters: int = 0
    """Adapters in host RAM (some of which may be in the pool too)."""
    num_adapter_loads: int = 0
    num_adapter_evictions: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    """Prompt tokens looked up in the prefix cache since start (vLLM's counter)."""
    prefix_cache_hits: int = 0
    """Of those, tokens found cached."""
    new_adapter_load_seconds: tuple[tuple[str, float], ...] = ()
    """(transition, seconds) of the loads since the previous reading, each reported once:
    `LOAD_TRANSITION` (a folder read into host RAM), `ACTIVATE_TRANSITION` (host RAM copied
    into the pool)."""
    new_step_seconds: tuple[float, ...] = ()
    """Wall time of each engine step since the previous reading (schedule, the copies, the
    forward pass and sampling, postprocess), each reported once."""
