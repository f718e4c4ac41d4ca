"""A full queue is a 429 with Retry-After; an engine failure fails the requests in
flight (500) and later ones (503) instead of hanging, and /health says so."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from factories import make_overflowing_adapter
from server_harness import Assets, Running, metric, start_server, wait_for

from loraserve.server.limits import RequestLimits

LONG = {"max_tokens": 200, "temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture
def one_at_a_time(assets: Assets) -> Iterator[Running]:
    """One running request and one waiting at most."""
    server = start_server(assets, engine_options={"max_num_seqs": 1, "max_waiting_requests": 1})
    yield server
    server.server.stop()


def test_a_full_queue_is_429_with_retry_after(one_at_a_time: Running) -> None:
    server = one_at_a_time.server
    client = server.client()
    first = client.completions.create(model="attn8", prompt="a", stream=True, **LONG)
    with first, server.http() as http:
        next(iter(first))  # it runs: the next one waits
        with client.completions.create(model="mlp4", prompt="b", stream=True, **LONG):
            body = {"model": "attn8", "prompt": "c", "max_tokens": 2}
            response = http.post("/v1/completions", json=body)
    assert response.status_code == 429
    assert int(response.headers["Retry-After"]) >= 1
    assert response.json()["error"]["code"] == "queue_full"
    answer = client.completions.create(
        model="attn8", prompt="d", max_tokens=2, extra_body={"ignore_eos": True}
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 2


@pytest.fixture
def small_queue(assets: Assets) -> Iterator[Running]:
    """One running request, three waiting at most, four sequences per request at most."""
    server = start_server(
        assets,
        engine_options={"max_num_seqs": 1, "max_waiting_requests": 3},
        limits=RequestLimits(max_sequences_per_request=4),
    )
    yield server
    server.server.stop()


def test_prompts_times_n_is_bounded_and_queued_all_or_none(small_queue: Running) -> None:
    """A request's sequences (prompts x n) are bounded before anything is queued (400), and
    weighed against the waiting queue at once: one that does not fit whole is a 429 that
    leaves nothing behind."""
    server = small_queue.server
    client = server.client()
    with server.http() as http:
        too_many = {"model": "attn8", "prompt": ["a", "b", "c"], "n": 2, "max_tokens": 2}
        response = http.post("/v1/completions", json=too_many)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "n"
        first = client.completions.create(model="attn8", prompt="a", stream=True, **LONG)
        with first:
            next(iter(first))  # it runs: the queue is empty, with room for 3
            two_by_two = {"model": "attn8", "prompt": ["b", "c"], "n": 2, "max_tokens": 2}
            response = http.post("/v1/completions", json=two_by_two)
            assert response.status_code == 429, response.text
            waiting = metric(http.get("/metrics").text, "vllm:num_requests_waiting")
            assert waiting == 0, "a refused request leaves none of its sequences queued"
    answer = client.completions.create(model="attn8", prompt=["b", "c"], n=1, max_tokens=2)
    assert len(answer.choices) == 2


@pytest.fixture
def failing(assets: Assets) -> Iterator[Running]:
    """A server whose engine-core process the test kills."""
    server = start_server(assets)
    yield server
    server.server.stop()


def num_running(running: Running) -> float:
    with running.server.http() as http:
        return metric(http.get("/metrics").text, "vllm:num_requests_running")


def test_an_engine_failure_fails_requests_in_flight_then_503(failing: Running) -> None:
    """The engine core dies mid-step (killed, as by the OOM killer): what is in flight
    fails at once rather than hanging, later requests get 503, /health says so."""
    running = failing
    client = running.server.client(timeout=30)
    with ThreadPoolExecutor(1) as pool:
        stream = client.completions.create(model="attn8", prompt="a", stream=True, **LONG)
        chunks = iter(stream)
        next(chunks)  # the engine is stepping
        plain = pool.submit(client.completions.create, model="mlp4", prompt="b", **LONG)
        assert wait_for(lambda: num_running(running) == 2)
        process = running.engine.client.process
        assert process is not None and process.pid is not None
        os.kill(process.pid, signal.SIGKILL)
        with pytest.raises(openai.APIError, match="engine"):
            for _ in chunks:  # the error arrives as an SSE error event
                pass
        with pytest.raises(openai.InternalServerError) as caught:
            plain.result(timeout=30)
    assert caught.value.status_code == 500
    with pytest.raises(openai.InternalServerError) as later:
        client.completions.create(model="attn8", prompt="c", max_tokens=2)
    assert later.value.status_code == 503
    with running.server.http() as http:
        assert http.get("/health").status_code == 503
        assert http.get("/v1/models").status_code == 200
        assert metric(http.get("/metrics").text, "loraserve_engine_healthy") == 0


def test_a_request_the_engine_fails_alone_does_not_touch_the_others(assets: Assets) -> None:
    """An adapter whose output overflows float32 (a broken fine-tune) gives NaN logits: the
    request using it gets the error, streams beside it run to their end, the engine stays
    healthy and every page comes back."""
    broken = make_overflowing_adapter(assets.base_model, assets.spare_dir / "overflowing")
    running = start_server(
        assets,
        {"max_adapter_weight": 1e38},  # refused by default: no trained adapter comes near
        allowed_adapter_roots=(str(assets.spare_dir),),
    )
    try:
        client = running.server.client(timeout=30)
        with running.server.http() as http:
            body = {"lora_name": "broken", "lora_path": str(broken)}
            assert http.post("/v1/load_lora_adapter", json=body).status_code == 200
        with ThreadPoolExecutor(2) as pool:
            stream = client.completions.create(model="attn8", prompt="a", stream=True, **LONG)
            chunks = iter(stream)
            next(chunks)
            beside = pool.submit(client.completions.create, model="mlp4", prompt="b", **LONG)
            with pytest.raises(openai.InternalServerError) as caught:
                client.completions.create(model="broken", prompt="c", **LONG)
            assert caught.value.body["code"] == "request_failed"  # type: ignore[index]
            assert "not finite" in str(caught.value)
            text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
            assert beside.result(timeout=60).usage.completion_tokens == 200  # type: ignore[union-attr]
        assert text
        with running.server.http() as http:
            assert http.get("/health").status_code == 200
            assert metric(http.get("/metrics").text, "loraserve_engine_healthy") == 1
            assert wait_for(
                lambda: metric(http.get("/metrics").text, "loraserve_pool_pages", use="kv") == 0
            )
    finally:
        running.server.stop()
