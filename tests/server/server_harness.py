"""What the server tests share: one tiny model and its adapters per session, real
servers (uvicorn on a free 127.0.0.1 port, in a thread of the test process), and
helpers to read /metrics. The fixtures reach tests through conftest.py.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from factories import make_adapter, make_model

from loraserve.engine.client.async_engine import AsyncEngine
from loraserve.engine.core.config import build_config
from loraserve.server.app import create_app
from loraserve.server.auth import Tenants
from loraserve.server.config import ServerConfig
from loraserve.server.limits import RequestLimits

ADAPTERS = {
    "attn8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp4": dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "all6": dict(
        r=6,
        lora_alpha=3,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
    ),
}
ENGINE_OPTIONS: dict[str, Any] = dict(device="cpu", pool_pages=96)
STARTUP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Assets:
    """Model folder, the served adapters' root, and a root of spare adapters for loading."""

    model: Path
    adapter_dir: Path
    spare_dir: Path
    base_model: Any  # the transformers model, to make more adapters

    @property
    def adapters(self) -> dict[str, Path]:
        return {name: self.adapter_dir / name for name in ADAPTERS}


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    root = tmp_path_factory.mktemp("server-assets")
    base_model = make_model(root / "tiny-llama", "llama")
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        make_adapter(base_model, root / "adapters" / name, seed=seed, **config)
    spare = root / "spare"
    make_adapter(base_model, spare / "extra", seed=9, r=5, lora_alpha=10, target_modules=["v_proj"])
    return Assets(root / "tiny-llama", root / "adapters", spare, base_model)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_process(
    assets: Assets,
    *options: str,
    cwd: Path | None = None,
    model: tuple[str, ...] | None = None,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[str], str]:
    """The installed `loraserve serve` in a process of its own (started in `cwd`, with `env`
    added to the environment), on a free port of 127.0.0.1, serving the tiny model (`model`:
    how the command line names it, `--model DIR` unless given) and the adapter folder on the
    CPU: (the process, its URL) once /health is 200. Its stdout and stderr are one text pipe;
    the caller stops it."""
    port = free_port()
    command = [str(Path(sys.executable).with_name("loraserve")), "serve"]
    command += ["--model", str(assets.model)] if model is None else list(model)
    command += ["--adapter-dir", str(assets.adapter_dir), "--port", str(port), "--device", "cpu"]
    process = subprocess.Popen(
        [*command, "--pool-pages", "64", *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        cwd=cwd,
    )
    url = f"http://127.0.0.1:{port}"
    started = wait_for(lambda: _health(url) == 200 or process.poll() is not None, timeout_s=90)
    if not started or process.poll() is not None:
        process.kill()
        raise AssertionError(f"loraserve did not start: {process.communicate()[0]}")
    return process, url


def _health(url: str) -> int:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code
    except httpx.HTTPError:
        return 0


def free_socket() -> socket.socket:
    """A socket bound to a free port of 127.0.0.1."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def url_of(sock: socket.socket) -> str:
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


class ServerThread:
    """uvicorn serving `app` from a background thread, on a free port of 127.0.0.1
    (and on `extra_sockets`, e.g. a metrics port)."""

    def __init__(self, app: Any, extra_sockets: tuple[socket.socket, ...] = ()) -> None:
        self._socket = free_socket()
        self._sockets = [self._socket, *extra_sockets]
        self.url = url_of(self._socket)
        self.extra_urls = [url_of(sock) for sock in extra_sockets]
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": self._sockets}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(STARTUP_TIMEOUT_S)
        for sock in self._sockets:
            sock.close()

    def client(self, api_key: str = "unused", **options: Any) -> openai.OpenAI:
        """The official client; no retries, so that a 429 or 5xx shows as it is."""
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **options)

    def http(self, **options: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30.0, **options)


@dataclass
class Running:
    """A started server and its engine (tests may reach in to inject faults)."""

    server: ServerThread
    engine: AsyncEngine
    app: Any


def start_server(
    assets: Assets,
    engine_options: dict[str, Any] | None = None,
    tenants: Tenants | None = None,
    limits: RequestLimits | None = None,
    metrics_socket: socket.socket | None = None,
    **server_options: Any,
) -> Running:
    """A server over a fresh engine with the session's adapters registered; with
    `metrics_socket`, its port is the server's --metrics-port."""
    options = {**ENGINE_OPTIONS, **(engine_options or {})}
    engine = AsyncEngine(build_config(str(assets.model), **options), assets.adapters)
    extra: tuple[socket.socket, ...] = ()
    if metrics_socket is not None:
        server_options["metrics_port"] = metrics_socket.getsockname()[1]
        extra = (metrics_socket,)
    app = create_app(engine, ServerConfig(**server_options), tenants, limits)
    return Running(ServerThread(app, extra), engine, app)


@pytest.fixture(scope="module")
def running(assets: Assets) -> Iterator[Running]:
    """The module's open server, which may load adapters from the spare root."""
    server = start_server(
        assets, allowed_adapter_roots=(str(assets.spare_dir),), max_request_body_bytes=32 * 1024
    )
    yield server
    server.server.stop()


@pytest.fixture
def http(running: Running) -> Iterator[httpx.Client]:
    """An HTTP client of the module's server (its own `running`, or the default above)."""
    with running.server.http() as client:
        yield client


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus text (0 when absent, as for a fresh counter)."""
    for line in text.splitlines():
        match = re.fullmatch(r"([^\s{]+)(\{(.*)\})?\s+(\S+)", line)
        if line.startswith("#") or match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(3) or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            return float(match.group(4))
    return 0.0


def series_labels(text: str, name: str) -> dict[str, str]:
    """The labels of the first series named `name`."""
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return dict(re.findall(r'(\w+)="([^"]*)"', line))
    raise AssertionError(f"no series {name} in /metrics")


def wait_for(condition: Any, timeout_s: float = 20.0, interval_s: float = 0.05) -> bool:
    """Poll `condition()` until true, at most `timeout_s`; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
