"""A client that goes away aborts its request: the pool's KV pages return to the
baseline, read through /metrics, as do the running counts. Also: the metric names
the Gateway API Inference Extension reads are there and say what runs."""

from __future__ import annotations

import json
import socket

import pytest
from server_harness import Running, metric, series_labels, wait_for

LONG_BODY = {"max_tokens": 500, "temperature": 0, "ignore_eos": True}  # near the model's 512
GATEWAY_METRICS = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:lora_requests_info",
    "vllm:cache_config_info",
)
OWN_METRICS = (
    "loraserve_pool_pages",
    "vllm:lora_adapter_loaded",
    "vllm:num_gpu_loaded_lora_adapters",
    "vllm:num_cpu_loaded_lora_adapters",
    "vllm:max_gpu_lora_adapters",
    "loraserve_adapter_loads_total",
    "loraserve_adapter_evictions_total",
    "vllm:lora_adapter_load_seconds_count",
    "loraserve_time_to_first_token_seconds_count",
    "loraserve_time_per_output_token_seconds_count",
    "loraserve_e2e_request_latency_seconds_count",
    "loraserve_prompt_tokens_total",
    "loraserve_generation_tokens_total",
    "loraserve_requests_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
)


def scrape(running: Running) -> str:
    with running.server.http() as http:
        return http.get("/metrics").text


def kv_pages(running: Running) -> float:
    return metric(scrape(running), "loraserve_pool_pages", use="kv")


def aborted(running: Running, model: str) -> float:
    return metric(scrape(running), "loraserve_requests_total", model=model, outcome="aborted")


def settled(running: Running, baseline: float) -> bool:
    text = scrape(running)
    return (
        metric(text, "loraserve_pool_pages", use="kv") == baseline
        and metric(text, "vllm:num_requests_running") == 0
    )


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_a_dropped_stream_is_aborted_and_its_pages_freed(running: Running, route: str) -> None:
    baseline, before = kv_pages(running), aborted(running, "attn8")
    body = {"model": "attn8", "stream": True, **LONG_BODY}
    if route.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "hello"}]
    else:
        body["prompt"] = "hello"
    with running.server.http() as http, http.stream("POST", route, json=body) as response:
        lines = response.iter_lines()  # kept: dropping the iterator would close the connection
        assert next(line for line in lines if line.startswith("data:"))
        assert kv_pages(running) > baseline  # it holds pages while it runs
    # The connection is closed here, long before 500 tokens could be generated.
    assert wait_for(lambda: settled(running, baseline))
    assert aborted(running, "attn8") == before + 1


def test_a_dropped_plain_request_is_aborted_and_its_pages_freed(running: Running) -> None:
    baseline, before = kv_pages(running), aborted(running, "mlp4")
    body = json.dumps({"model": "mlp4", "prompt": "hello", **LONG_BODY}).encode()
    host, port = running.server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n"
            b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        # closed as soon as it holds pages, long before 500 tokens are generated
        assert wait_for(lambda: kv_pages(running) > baseline, interval_s=0.002)
    assert wait_for(lambda: settled(running, baseline))
    assert aborted(running, "mlp4") == before + 1


def test_metrics_carry_the_names_the_gateway_reads_and_ours(running: Running) -> None:
    running.server.client().completions.create(model="all6", prompt="hi", max_tokens=3)
    text = scrape(running)
    for name in GATEWAY_METRICS + OWN_METRICS:
        assert any(line.startswith(name) for line in text.splitlines()), name
    uses = ("kv", "kv_cached", "adapter", "free")
    pages = [metric(text, "loraserve_pool_pages", use=use) for use in uses]
    assert sum(pages) == metric(text, "loraserve_pool_pages_total") == 96
    assert metric(text, "loraserve_requests_total", model="all6", outcome="finished") >= 1
    assert series_labels(text, "vllm:cache_config_info")["num_gpu_blocks"] == "96"


def test_lora_requests_info_names_the_running_adapters(running: Running) -> None:
    body = {"model": "all6", "prompt": "hello", "stream": True, **LONG_BODY}
    with running.server.http() as http, http.stream("POST", "/v1/completions", json=body) as reply:
        lines = reply.iter_lines()  # kept: dropping the iterator would close the connection
        assert json.loads(next(lines).removeprefix("data: "))["choices"]
        text = scrape(running)
        labels = series_labels(text, "vllm:lora_requests_info")
        assert labels["running_lora_adapters"] == "all6"
        assert labels["waiting_lora_adapters"] == ""
        assert int(labels["max_lora"]) >= 1
        assert metric(text, "vllm:num_requests_running") == 1
        assert 0 < metric(text, "vllm:kv_cache_usage_perc") <= 1
    assert wait_for(lambda: metric(scrape(running), "vllm:num_requests_running") == 0)
    labels = series_labels(scrape(running), "vllm:lora_requests_info")
    assert labels["running_lora_adapters"] == ""


def test_a_repeated_prompt_hits_the_prefix_cache(running: Running) -> None:
    """vLLM's counters, in tokens: the second send of a 40-token prompt finds its two full
    16-token blocks; under another adapter it finds nothing."""
    client = running.server.client()
    prompt = [7 + (index * 13) % 250 for index in range(40)]
    before = scrape(running)
    model_name = series_labels(before, "vllm:prefix_cache_hits_total")["model_name"]

    def counters() -> tuple[float, float]:
        text = scrape(running)
        return tuple(  # type: ignore[return-value]
            metric(text, f"vllm:prefix_cache_{name}_total", model_name=model_name)
            for name in ("queries", "hits")
        )

    start = counters()
    for model in ("all6", "all6", "mlp4"):
        client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
    queries, hits = counters()
    assert queries - start[0] == 3 * 40
    assert hits - start[1] == 2 * 16
    text = scrape(running)
    assert metric(text, "loraserve_pool_pages", use="kv_cached") >= 4  # 2 blocks of all6, 2 of mlp4
