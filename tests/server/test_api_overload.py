"""A full queue is a 429 with Retry-After; an engine failure fails the requests in
flight (500) and later ones (503) instead of hanging, and /health says so."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
from server_harness import Assets, Running, metric, start_server, wait_for

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
    answer = client.completions.create(model="attn8", prompt="d", max_tokens=2)
    assert answer.usage is not None and answer.usage.completion_tokens == 2


@pytest.fixture
def failing(assets: Assets) -> Iterator[tuple[Running, threading.Event]]:
    """A server whose engine step raises once the event is set."""
    server = start_server(assets)
    engine = server.engine.engine
    fail = threading.Event()
    step = engine.step

    def faulty_step() -> Any:
        if fail.is_set():
            raise RuntimeError("injected fault")
        return step()

    engine.step = faulty_step  # type: ignore[method-assign]
    yield server, fail
    server.server.stop()


def test_an_engine_failure_fails_requests_in_flight_then_503(
    failing: tuple[Running, threading.Event],
) -> None:
    running, fail = failing
    client = running.server.client(timeout=30)
    with ThreadPoolExecutor(1) as pool:
        stream = client.completions.create(model="attn8", prompt="a", stream=True, **LONG)
        chunks = iter(stream)
        next(chunks)  # the engine is stepping
        plain = pool.submit(client.completions.create, model="mlp4", prompt="b", **LONG)
        assert wait_for(lambda: running.engine.engine.scheduler.num_running() == 2)
        fail.set()
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


def test_a_request_the_engine_fails_alone_does_not_touch_the_others(
    assets: Assets, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NaN logits for one request (a model fault attributable to it): that request gets the
    error, streams beside it run to their end, and the engine stays healthy."""
    from loraserve.engine import engine as engine_module

    real_sample = engine_module.sample

    def poisoned_sample(logits: Any, params: Any, states: Any, *args: Any) -> Any:
        logits = logits.clone()
        for row, state in enumerate(states):
            if state.prompt == "poisoned" and len(state.output_token_ids) >= 3:
                logits[row, 5] = math.nan
        return real_sample(logits, params, states, *args)

    monkeypatch.setattr(engine_module, "sample", poisoned_sample)
    running = start_server(assets)
    try:
        client = running.server.client(timeout=30)
        with ThreadPoolExecutor(2) as pool:
            stream = client.completions.create(model="attn8", prompt="a", stream=True, **LONG)
            chunks = iter(stream)
            next(chunks)
            beside = pool.submit(client.completions.create, model="mlp4", prompt="b", **LONG)
            with pytest.raises(openai.InternalServerError) as caught:
                client.completions.create(model="all6", prompt="poisoned", **LONG)
            assert caught.value.body["code"] == "request_failed"  # type: ignore[index]
            assert "not finite" in str(caught.value)
            text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
            assert beside.result(timeout=60).usage.completion_tokens == 200  # type: ignore[union-attr]
        assert text
        with running.server.http() as http:
            assert http.get("/health").status_code == 200
            assert metric(http.get("/metrics").text, "loraserve_engine_healthy") == 1
        assert wait_for(lambda: running.engine.engine.memory.num_kv_pages == 0)
    finally:
        running.server.stop()
