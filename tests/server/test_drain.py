"""SIGTERM drains a real `loraserve serve` process: /health turns 503 while connections are
still accepted, new requests get 503, the stream in flight runs to its end, and the process
exits 0; a drain that runs out of time cuts what is left and exits 1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from server_harness import Assets, wait_for
from test_cli import free_port

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
    port = free_port()
    command = [sys.executable, "-m", "loraserve.server.cli", "serve", "--model", str(assets.model)]
    command += ["--adapter-dir", str(assets.adapter_dir), "--port", str(port), "--device", "cpu"]
    command += ["--pool-pages", "64", "--log-level", "warning"]
    command += ["--drain-timeout-seconds", str(drain_seconds)]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _status(url) == 200 or process.poll() is not None, timeout_s=90)
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def _status(url: str) -> int:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code
    except httpx.HTTPError:
        return 0


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
        import json

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
        stream = Stream(url)
        stream.start()
        assert stream.started.wait(30)
        process.send_signal(signal.SIGTERM)
        with httpx.Client(base_url=url, timeout=10) as http:
            assert wait_for(lambda: http.get("/health").status_code == 503, timeout_s=10)
            assert http.get("/health").json()["error"]["code"] == "draining"
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
        stream = Stream(url)
        stream.start()
        assert stream.started.wait(30)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 1
        stream.join(30)
    assert stream.completion_tokens() < STREAM["max_tokens"]  # cut: no final usage, or fewer
