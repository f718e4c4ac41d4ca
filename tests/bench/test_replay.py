"""bench/replay.py against a real loraserve server (tiny model, two adapters, CPU).

The server is the one the server tests use (uvicorn in a thread of this process,
on a free port); the trace names `lora-0000` and `lora-0001`, registered under
those names, and the base model.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from factories import make_adapter, make_model
from server_harness import ServerThread

from loraserve.bench.metrics import summarize
from loraserve.bench.replay import replay
from loraserve.bench.trace import TraceParams, TraceRequest, adapter_name, generate_trace
from loraserve.engine.client.async_engine import AsyncEngine
from loraserve.engine.core.config import build_config
from loraserve.server.app import create_app
from loraserve.server.config import ServerConfig

BASE_MODEL = "tiny-base"
NUM_ADAPTERS = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """(URL, vocabulary size) of a server with adapters lora-0000 and lora-0001."""
    root = tmp_path_factory.mktemp("replay")
    base = make_model(root / "model", "llama")
    adapters = {
        adapter_name(i): make_adapter(
            base, root / adapter_name(i), seed=i, r=4 * (i + 1), lora_alpha=8
        )
        for i in range(NUM_ADAPTERS)
    }
    config = build_config(
        str(root / "model"), device="cpu", pool_pages=96, served_model_name=BASE_MODEL
    )
    engine = AsyncEngine(config, adapters)
    thread = ServerThread(create_app(engine, ServerConfig()))
    yield thread.url, base.config.vocab_size
    thread.stop()
    engine.shutdown()


def trace(vocab_size: int, **changes: Any) -> list[TraceRequest]:
    params = TraceParams(
        num_adapters=NUM_ADAPTERS,
        alpha=1.0,
        req_rate=20.0,
        cv=1.0,
        duration=1.0,
        input_range=(2, 12),
        output_range=(1, 8),
        seed=3,
        vocab_size=vocab_size,
    )
    return generate_trace(replace(params, **changes))


def test_every_request_completes_with_its_exact_length(server: tuple[str, int]) -> None:
    url, vocab_size = server
    requests = trace(vocab_size) + trace(vocab_size, num_adapters=0, seed=4)
    records, duration = asyncio.run(replay(url, requests, base_model=BASE_MODEL))
    assert [record.error for record in records] == [None] * len(requests)
    assert {r.adapter for r in requests} == {None, adapter_name(0), adapter_name(1)}
    for request, record in zip(requests, records, strict=True):
        assert record.index == request.index and record.adapter == request.adapter
        assert record.output_tokens == request.output_len  # ignore_eos: exactly max_tokens
        assert record.sent_s is not None and record.first_token_s is not None
        assert record.finish_s is not None
        assert request.arrival_s <= record.sent_s <= record.first_token_s <= record.finish_s
    assert duration == pytest.approx(
        max(r.finish_s or 0.0 for r in records) - min(r.arrival_s for r in records)
    )
    assert summarize(records, duration)["completed"] == len(requests)


def test_refused_requests_are_recorded_not_raised(server: tuple[str, int]) -> None:
    url, vocab_size = server
    requests = trace(vocab_size, num_adapters=NUM_ADAPTERS + 2)  # lora-0002, -0003 unknown
    records, _ = asyncio.run(replay(url, requests, base_model=BASE_MODEL))
    registered = {adapter_name(i) for i in range(NUM_ADAPTERS)}
    assert any(r.adapter not in registered for r in requests)
    for request, record in zip(requests, records, strict=True):
        if request.adapter in registered:
            assert record.error is None
        else:
            assert record.error is not None and record.error.startswith("HTTP 404")


def test_an_unreachable_server_gives_errors() -> None:
    with socket.socket() as probe:  # a port nothing listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    requests = trace(100, duration=0.3)
    records, _ = asyncio.run(replay(f"http://127.0.0.1:{port}", requests, base_model=BASE_MODEL))
    assert records and all(r.error and r.error.startswith("ConnectError") for r in records)
