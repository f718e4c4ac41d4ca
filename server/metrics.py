"""Prometheus metrics at /metrics.

Two families of names:
- vLLM's, which Kubernetes' Gateway API Inference Extension reads to route by
  queue length, KV-cache usage and adapter affinity: `vllm:num_requests_running`,
  `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc` (a fraction, 1 = full,
  as in vLLM; these three with `model_name`, as vLLM's), `vllm:lora_requests_info`
  (value = now, labels = running/waiting adapters comma-joined, `max_lora`), `vllm:cache_config_info`; and the residency
  series of vLLM's LoRA metrics stack (vLLM PRs #54830/#54833) that the llm-d
  router's residency scorer reads (llm-d-router #2792): one
  `vllm:lora_adapter_loaded{adapter_name, level, pinned, rank, model_name}` = 1 per
  adapter that is loaded, at its best level (`gpu`: in the pool, on whatever device;
  `cpu`: in host RAM only), gone once it is evicted from both; `pinned` is
  "true"/"false" (--pin-adapter); `vllm:num_gpu_loaded_lora_adapters`,
  `vllm:num_cpu_loaded_lora_adapters` (adapters in host RAM, whether or not also in
  the pool), `vllm:max_gpu_lora_adapters` (adapter slots of the pool), and the
  `vllm:lora_adapter_load_seconds` histogram by `transition` (`load`: a folder read
  into host RAM; `activate`: host RAM copied into the pool; the label and values the
  residency scorer prices misses with); and vLLM's prefix-cache
  counters in tokens, `vllm:prefix_cache_queries_total` (prompt tokens looked up when
  requests are admitted) and `vllm:prefix_cache_hits_total` (of those, tokens found
  cached), with `model_name`.
- loraserve's own `loraserve_*`: pool pages by use (`kv`: read by running requests;
  `kv_cached`: cached blocks nothing reads, reclaimable; `adapter`; `free`: the four sum
  to `loraserve_pool_pages_total`), adapter loads/evictions, the engine step's wall time
  (`loraserve_engine_step_seconds`), request latency histograms, token counters,
  requests per model (adapter).
- request latencies and tokens under vLLM's names too, with `model_name`
  (server/request_metrics.py), so that vLLM's dashboards work.

Engine gauges are read at scrape time from an `EngineStats` the engine thread took,
so a scrape shows one consistent step boundary. Each app has its own registry.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loraserve.engine.core.outputs import EngineStats
from loraserve.server.request_metrics import TOKEN_LATENCY_BUCKETS, RequestMetrics

# The `*_created` series only repeat the start time, once per metric; vLLM leaves them out too.
disable_created_metrics()


@dataclass(frozen=True)
class StaticInfo:
    """What the metrics say about the configuration (fixed at start-up)."""

    block_size: int
    num_pages: int
    max_lora: int
    gpu_memory_utilization: float
    dtype: str
    model_name: str = ""
    """The served base model's name (vLLM's `model_name` label)."""
    max_model_len: int = 2048
    """The context limit (the top bucket of the token-count histograms)."""


class ServerMetrics:
    """The app's registry: request-side metrics observed by routes, engine-side ones
    collected from the latest `EngineStats`."""

    def __init__(self, info: StaticInfo) -> None:
        self.registry = CollectorRegistry()
        self.stats = EngineStats()
        self.healthy = True
        self.registry.register(_EngineCollector(self, info))
        self.adapter_load_seconds = Histogram(
            "vllm:lora_adapter_load_seconds",
            "Time to load an adapter, by transition: load (read from disk into host RAM), "
            "activate (copied from host RAM into the pool).",
            ["transition"],
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.step_seconds = Histogram(
            "loraserve_engine_step_seconds",
            "Wall time of each engine step: schedule, adapter copies, forward pass and "
            "sampling, postprocess.",
            buckets=TOKEN_LATENCY_BUCKETS,  # a decode step is one token of each request
            registry=self.registry,
        )
        self.requests = RequestMetrics(self.registry, info.model_name, info.max_model_len)

    def update(self, stats: EngineStats, healthy: bool) -> None:
        """Take a fresh engine picture (call before `render`)."""
        self.stats = stats
        self.healthy = healthy
        for transition, seconds in stats.new_adapter_load_seconds:
            self.adapter_load_seconds.labels(transition=transition).observe(seconds)
        for seconds in stats.new_step_seconds:
            self.step_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Gauges and counters read from the latest EngineStats at scrape time."""

    def __init__(self, metrics: ServerMetrics, info: StaticInfo) -> None:
        self.metrics = metrics
        self.info = info

    def collect(self) -> Iterator[Metric]:
        stats = self.metrics.stats
        yield from self._vllm(stats)
        yield from self._residency(stats)
        yield from self._pool(stats)
        yield from self._prefix_cache(stats)

    def _vllm(self, stats: EngineStats) -> Iterator[Metric]:
        usage = _usage(stats)
        for name, documentation, value in (
            ("vllm:num_requests_running", "Requests running.", stats.num_running),
            ("vllm:num_requests_waiting", "Requests waiting.", stats.num_waiting),
            ("vllm:kv_cache_usage_perc", "Pool usage, 1 = full.", usage),
            # The older name, still read by earlier Gateway API Inference Extension releases.
            ("vllm:gpu_cache_usage_perc", "Pool usage, 1 = full.", usage),
        ):
            # With model_name, as vLLM's: its dashboards select `{model_name="$model_name"}`.
            gauge = GaugeMetricFamily(name, documentation, labels=["model_name"])
            gauge.add_metric([self.info.model_name], value)
            yield gauge
        lora = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running and waiting adapters (value: time of the reading); "
            "vllm:lora_adapter_loaded says which adapters are loaded.",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        running, waiting = ",".join(stats.running_adapters), ",".join(stats.waiting_adapters)
        lora.add_metric([running, waiting, str(self.info.max_lora)], time.time())
        yield lora
        config = GaugeMetricFamily(
            "vllm:cache_config_info",
            "The pool's configuration.",
            labels=["block_size", "num_gpu_blocks", "gpu_memory_utilization", "cache_dtype"],
        )
        info = self.info
        labels = [info.block_size, info.num_pages, info.gpu_memory_utilization, info.dtype]
        config.add_metric([str(value) for value in labels], 1)
        yield config

    def _residency(self, stats: EngineStats) -> Iterator[Metric]:
        loaded = GaugeMetricFamily(
            "vllm:lora_adapter_loaded",
            "1 per loaded adapter, at its best level: gpu (in the pool), cpu (host RAM only).",
            labels=["model_name", "adapter_name", "level", "pinned", "rank"],
        )
        for name, level, pinned, rank in stats.loaded_adapters:
            labels = [self.info.model_name, name, level, str(pinned).lower(), str(rank)]
            loaded.add_metric(labels, 1)
        yield loaded
        num_gpu = sum(level == "gpu" for _, level, _, _ in stats.loaded_adapters)
        for name, documentation, value in (
            ("vllm:num_gpu_loaded_lora_adapters", "Adapters in the pool.", num_gpu),
            ("vllm:num_cpu_loaded_lora_adapters", "Adapters in host RAM.", stats.num_host_adapters),
            ("vllm:max_gpu_lora_adapters", "Adapter slots of the pool.", self.info.max_lora),
        ):
            gauge = GaugeMetricFamily(name, documentation, labels=["model_name"])
            gauge.add_metric([self.info.model_name], value)
            yield gauge

    def _pool(self, stats: EngineStats) -> Iterator[Metric]:
        pages = GaugeMetricFamily(
            "loraserve_pool_pages",
            "Pool pages by use (kv, kv_cached, adapter, free).",
            labels=["use"],
        )
        pages.add_metric(["kv"], stats.num_kv_pages)
        pages.add_metric(["kv_cached"], stats.num_cached_kv_pages)
        pages.add_metric(["adapter"], stats.num_adapter_pages)
        pages.add_metric(["free"], stats.num_free_pages)
        yield pages
        yield _gauge("loraserve_pool_pages_total", "Pages in the pool.", stats.num_total_pages)
        yield _counter("loraserve_adapter_loads", "Adapters copied in.", stats.num_adapter_loads)
        yield _counter(
            "loraserve_adapter_evictions", "Adapters evicted.", stats.num_adapter_evictions
        )
        yield _counter("loraserve_preemptions", "Requests preempted.", stats.num_preemptions)
        yield _gauge(
            "loraserve_engine_healthy", "1 while the engine runs.", int(self.metrics.healthy)
        )

    def _prefix_cache(self, stats: EngineStats) -> Iterator[Metric]:
        for name, documentation, value in (
            (
                "vllm:prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                stats.prefix_cache_queries,
            ),
            (
                "vllm:prefix_cache_hits",
                "Prompt tokens found in the prefix cache.",
                stats.prefix_cache_hits,
            ),
        ):
            counter = CounterMetricFamily(name, documentation, labels=["model_name"])
            counter.add_metric([self.info.model_name], value)
            yield counter


def _usage(stats: EngineStats) -> float:
    """KV pages plus the pages of adapters in use or pinned, over all pages. Idle
    resident adapters and cached blocks count as free: they are reclaimed as soon as the
    pages are wanted (vLLM counts its cached blocks so too)."""
    if not stats.num_total_pages:
        return 0.0
    return (stats.num_kv_pages + stats.num_pinned_adapter_pages) / stats.num_total_pages


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)
