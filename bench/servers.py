"""A real `loraserve serve` process for a benchmark: started on a free port of 127.0.0.1,
waited for until /health answers, stopped when the benchmark is done."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

BASE_MODEL_NAME = "base"
"""The name the benchmarks serve the base model under (the `model` of a request)."""
SERVER_STARTUP_TIMEOUT_S = 600.0  # registering 512 adapters reads them all from disk


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def loraserve_server(
    model: Path, adapters: dict[str, Path], server_args: list[str]
) -> Iterator[str]:
    """A `loraserve serve` process on a free port; yields its URL, stops it on exit."""
    port = free_port()
    command = [sys.executable, "-P", "-m", "loraserve.server.cli", "serve", "--model", str(model)]
    command += ["--served-model-name", BASE_MODEL_NAME, "--port", str(port), *server_args]
    for name, folder in adapters.items():
        command += ["--adapter", f"{name}={folder}"]
    process = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(url, process)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def _wait_until_healthy(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + SERVER_STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"loraserve exited with code {process.returncode} at start-up")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"loraserve did not become healthy within {SERVER_STARTUP_TIMEOUT_S} s")
