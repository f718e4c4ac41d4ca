"""Latency and token metrics of served requests, under loraserve's names and vLLM's.

vLLM's names carry a `model_name` label (the served base model, as vLLM labels LoRA
requests too), so that stock vLLM Grafana dashboards work against loraserve (every panel
of vLLM's example dashboard: tests/deploy/test_metric_names.py):
`vllm:time_to_first_token_seconds`, `vllm:time_per_output_token_seconds`,
`vllm:inter_token_latency_seconds` (each gap between two tokens of a completion),
`vllm:e2e_request_latency_seconds`, and per finished completion (one engine request, as
vLLM counts them) `vllm:request_queue_time_seconds` (queued in the engine core until its
first step), `vllm:request_prefill_time_seconds` (that step to its first token),
`vllm:request_decode_time_seconds` (first token to last), `vllm:request_inference_time_seconds`
(prefill + decode), `vllm:request_prompt_tokens` and `vllm:request_generation_tokens`;
per prompt `vllm:request_max_num_generation_tokens` (the longest of its `n` completions)
(histograms); `vllm:prompt_tokens_total`, `vllm:generation_tokens_total` and
`vllm:request_success_total` (by `finished_reason`). loraserve's own (`loraserve_*`) stay
as they were; requests per adapter and outcome are `loraserve_requests_total`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram

from loraserve.engine.core.outputs import CompletionDelta
from loraserve.server.responses import Usage

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
)


def token_count_buckets(max_model_len: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `max_model_len` (vLLM's buckets of token counts)."""
    buckets: list[int] = []
    scale = 1
    while True:
        for step in (1, 2, 5):
            if step * scale > max(max_model_len, 1):
                return tuple(buckets)
            buckets.append(step * scale)
        scale *= 10


class RequestMetrics:
    """What the routes observe of each request, recorded under both families of names."""

    def __init__(self, registry: CollectorRegistry, model_name: str, max_model_len: int) -> None:
        self.model_name = model_name
        self._vllm_only = {
            name: Histogram(
                f"vllm:{name}", documentation, ["model_name"], buckets=buckets, registry=registry
            ).labels(model_name)
            for name, documentation, buckets in _vllm_histograms(max_model_len)
        }
        self._ttft = _pair(
            registry,
            "time_to_first_token_seconds",
            "From request arrival to its first generated token.",
            LATENCY_BUCKETS,
        )
        self._tpot = _pair(
            registry,
            "time_per_output_token_seconds",
            "Mean time between generated tokens after the first, per completion.",
            TOKEN_LATENCY_BUCKETS,
        )
        self._e2e = _pair(
            registry,
            "e2e_request_latency_seconds",
            "From request arrival to its last token.",
            LATENCY_BUCKETS,
        )
        self._prompt_tokens = Counter(
            "loraserve_prompt_tokens", "Prompt tokens of served requests.", registry=registry
        )
        self._generation_tokens = Counter(
            "loraserve_generation_tokens", "Tokens generated.", registry=registry
        )
        self._vllm_prompt_tokens = Counter(
            "vllm:prompt_tokens",
            "Prompt tokens of served requests.",
            ["model_name"],
            registry=registry,
        )
        self._vllm_generation_tokens = Counter(
            "vllm:generation_tokens", "Tokens generated.", ["model_name"], registry=registry
        )
        self.requests = Counter(
            "loraserve_requests",
            "Requests by model (base model or adapter) and outcome "
            "(finished; aborted: the client went away; failed).",
            ["model", "outcome"],
            registry=registry,
        )
        self._success = Counter(
            "vllm:request_success",
            "Requests finished, by finish reason (stop, length, abort).",
            ["model_name", "finished_reason"],
            registry=registry,
        )

    def first_token(self, seconds: float) -> None:
        self._observe(self._ttft, seconds)

    def time_per_output_token(self, seconds: float) -> None:
        self._observe(self._tpot, seconds)

    def inter_token_latency(self, seconds: float, num_tokens: int) -> None:
        """`num_tokens` gaps of `seconds` each (tokens that arrived together share the gap)."""
        histogram = self._vllm_only["inter_token_latency_seconds"]
        for _ in range(num_tokens):
            histogram.observe(seconds)

    def completion_finished(self, completion: CompletionTimes, num_prompt_tokens: int) -> None:
        """One completion's (one engine request's) times and token counts."""
        observe = self._vllm_only
        observe["request_prompt_tokens"].observe(num_prompt_tokens)
        observe["request_generation_tokens"].observe(completion.num_tokens)
        decode = completion.last_token - completion.first_token
        observe["request_decode_time_seconds"].observe(decode)
        if completion.queue_seconds is not None and completion.prefill_seconds is not None:
            observe["request_queue_time_seconds"].observe(completion.queue_seconds)
            observe["request_prefill_time_seconds"].observe(completion.prefill_seconds)
            observe["request_inference_time_seconds"].observe(completion.prefill_seconds + decode)

    def prompt_finished(self, max_num_generation_tokens: int) -> None:
        """One prompt's `n` completions: the longest one's tokens."""
        self._vllm_only["request_max_num_generation_tokens"].observe(max_num_generation_tokens)

    def finished(
        self,
        seconds: float,
        num_prompt_tokens: int,
        num_generated_tokens: int,
        model: str,
        outcome: str,
        finish_reasons: list[str],
    ) -> None:
        """One request's end: `outcome` finished, aborted or failed; the finish reason of
        each of its completions."""
        self._observe(self._e2e, seconds)
        self._prompt_tokens.inc(num_prompt_tokens)
        self._generation_tokens.inc(num_generated_tokens)
        self._vllm_prompt_tokens.labels(self.model_name).inc(num_prompt_tokens)
        self._vllm_generation_tokens.labels(self.model_name).inc(num_generated_tokens)
        self.requests.labels(model=model, outcome=outcome).inc()
        if outcome != "failed":
            for reason in finish_reasons:
                self._success.labels(self.model_name, reason).inc()

    def _observe(self, pair: tuple[Histogram, Histogram], seconds: float) -> None:
        ours, vllm = pair
        ours.observe(seconds)
        vllm.labels(self.model_name).observe(seconds)


def _pair(
    registry: CollectorRegistry, name: str, documentation: str, buckets: tuple[float, ...]
) -> tuple[Histogram, Histogram]:
    """loraserve_<name> and vllm:<name> (with model_name)."""
    ours = Histogram(f"loraserve_{name}", documentation, buckets=buckets, registry=registry)
    vllm = Histogram(
        f"vllm:{name}", documentation, ["model_name"], buckets=buckets, registry=registry
    )
    return ours, vllm


def _vllm_histograms(max_model_len: int) -> list[tuple[str, str, tuple[float, ...]]]:
    """(name, help, buckets) of the histograms kept under vLLM's names only."""
    tokens = token_count_buckets(max_model_len)
    return [
        (
            "inter_token_latency_seconds",
            "Time between two tokens of a completion.",
            TOKEN_LATENCY_BUCKETS,
        ),
        (
            "request_queue_time_seconds",
            "Time a request waited in the engine core's queue before its first step.",
            LATENCY_BUCKETS,
        ),
        (
            "request_prefill_time_seconds",
            "From a request's first step to its first token.",
            LATENCY_BUCKETS,
        ),
        (
            "request_decode_time_seconds",
            "From a request's first token to its last.",
            LATENCY_BUCKETS,
        ),
        (
            "request_inference_time_seconds",
            "From a request's first step to its last token (prefill + decode).",
            LATENCY_BUCKETS,
        ),
        ("request_prompt_tokens", "Prompt tokens of a finished request.", tokens),
        ("request_generation_tokens", "Tokens a finished request generated.", tokens),
        (
            "request_max_num_generation_tokens",
            "Tokens of the longest of a prompt's n completions.",
            tokens,
        ),
    ]


@dataclass
class CompletionTimes:
    """One completion's progress, as the front end saw it (times: `time.perf_counter()`)."""

    first_token: float
    last_token: float
    num_tokens: int = 0
    queue_seconds: float | None = None
    prefill_seconds: float | None = None


@dataclass
class Tracker:
    """Latency and token accounting of one HTTP request, for the metrics."""

    metrics: RequestMetrics
    model: str
    prompt_lengths: list[int]
    """Tokens of each of the request's prompts."""
    arrival: float = field(default_factory=time.perf_counter)
    """When the request came in (`time.perf_counter()`), before tokenizing and queueing."""
    first_token: float | None = None
    completions: dict[tuple[int, int], CompletionTimes] = field(default_factory=dict)
    """(prompt, completion) -> its progress."""
    finish_reasons: list[str] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(self.prompt_lengths)

    def observe(self, prompt_index: int, delta: CompletionDelta) -> None:
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
            self.metrics.first_token(now - self.arrival)
        key = (prompt_index, delta.index)
        completion = self.completions.get(key)
        if completion is None:
            completion = CompletionTimes(now, now, 0, delta.queue_seconds, delta.prefill_seconds)
            self.completions[key] = completion
        elif (num_new := delta.num_tokens - completion.num_tokens) > 0:
            self.metrics.inter_token_latency((now - completion.last_token) / num_new, num_new)
            completion.last_token = now
        completion.num_tokens = delta.num_tokens
        if delta.finish_reason is not None:
            self.finish_reasons.append(delta.finish_reason)
        if delta.finished:
            self.metrics.completion_finished(completion, self.prompt_lengths[prompt_index])
            if delta.num_tokens > 1:
                mean = (now - completion.first_token) / (delta.num_tokens - 1)
                self.metrics.time_per_output_token(mean)

    def close(self, outcome: str) -> None:
        """Record the request's end: `finished`, `aborted` (client gone) or `failed`."""
        longest: dict[int, int] = {}
        for (prompt_index, _), completion in self.completions.items():
            longest[prompt_index] = max(longest.get(prompt_index, 0), completion.num_tokens)
        for num_tokens in longest.values():
            self.metrics.prompt_finished(num_tokens)
        self.metrics.finished(
            time.perf_counter() - self.arrival,
            self.num_prompt_tokens,
            sum(completion.num_tokens for completion in self.completions.values()),
            self.model,
            outcome,
            self.finish_reasons if outcome == "finished" else ["abort"],
        )

    def usage(self) -> Usage:
        completion_tokens = sum(completion.num_tokens for completion in self.completions.values())
        return Usage(
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=self.num_prompt_tokens + completion_tokens,
        )
