"""Latency and token metrics of served requests, under loraserve's names and vLLM's.

vLLM's names carry a `model_name` label (the served base model, as vLLM labels LoRA
requests too), so that stock vLLM Grafana dashboards work against loraserve:
`vllm:time_to_first_token_seconds`, `vllm:time_per_output_token_seconds`,
`vllm:e2e_request_latency_seconds` (histograms), `vllm:prompt_tokens_total`,
`vllm:generation_tokens_total` and `vllm:request_success_total` (by `finished_reason`).
loraserve's own (`loraserve_*`) stay as they were; requests per adapter and outcome are
`loraserve_requests_total`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

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


class RequestMetrics:
    """What the routes observe of each request, recorded under both families of names."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        self.model_name = model_name
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
