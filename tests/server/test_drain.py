"""SIGTERM drains a real `loraserve serve` process: /health turns 503 while connections are
still accepted, new requests get 503, the stream in flight runs to its end, and the process
exits 0; a drain that runs out of time cuts what is left and exits 1."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from server_harness import Assets, start_process, wait_for

STREAM = {
    "model": "attn8",
    "prompt": "hello",
    "max_tokens": 500,
    "temperature": 0,
    "ignore_eos": True,
    "stream": True,
    "stream_options": {"include_usage": True},
}


@contextmanager
def serving(assets: Assets, drain_seconds: float) -> Iterator[tuple[subprocess.Popen[str], str]]:
    drain = ["--drain-timeout-seconds", str(drain_seconds), "--log-level", "warning"]
    process, url = start_process(assets, *drain)
    try:
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def stream_then_sigterm(process: subprocess.Popen[str], url: str) -> Stream:
    """A long stream under way, then SIGTERM."""
    stream = Stream(url)
    stream.start()
    assert stream.started.wait(30)
    process.send_signal(signal.SIGTERM)
    return stream


class Stream(threading.Thread):
    """One streamed completion, read to its end in the background."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.started = threading.Event()
        self.events: list[dict[str, Any]] = []
        self.done = False
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with (
                httpx.Client(timeout=60) as http,
                http.stream("POST", f"{self.url}/v1/completions", json=STREAM) as response,
            ):
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        self.events.append(json.loads(line.removeprefix("data: ")))
                        self.started.set()
        except httpx.HTTPError as error:
            self.error = error
        self.started.set()

    def completion_tokens(self) -> int:
        usage = [event["usage"] for event in self.events if event.get("usage")]
        return usage[-1]["completion_tokens"] if usage else 0


@pytest.mark.slow
def test_sigterm_drains_then_exits_0(assets: Assets) -> None:
    with serving(assets, drain_seconds=25) as (process, url):
        stream = stream_then_sigterm(process, url)
        with httpx.Client(base_url=url, timeout=10) as http:
            assert wait_for(lambda: http.get("/health").status_code == 503, timeout_s=10)
            assert http.get("/health").json()["error"]["code"] == "draining"
            assert http.get("/ping").status_code == 503  # load balancers probe this one too
            body = {"model": "attn8", "prompt": "late", "max_tokens": 2}
            late = http.post("/v1/completions", json=body)
            assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
            assert http.get("/v1/models").status_code == 200  # reads still answered
        assert stream.is_alive(), "the stream should still be running: make it longer"
        stream.join(60)
        assert process.wait(timeout=30) == 0
    assert stream.error is None and stream.done
    assert stream.completion_tokens() == STREAM["max_tokens"]


@pytest.mark.slow
def test_a_drain_that_runs_out_of_time_cuts_and_exits_1(assets: Assets) -> None:
    with serving(assets, drain_seconds=0) as (process, url):
        stream = stream_then_sigterm(process, url)
        assert process.wait(timeout=30) == 1
        stream.join(30)
    assert stream.completion_tokens() < STREAM["max_tokens"]  # cut: no final usage, or fewer
