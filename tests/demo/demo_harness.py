"""The real demo for the tests of this folder: the model converted from the package's GGUF
file once per test session (as `make demo` does), and `loraserve demo` started once, as a
user starts it, serving besides the four trained adapters one of random weights (strong
enough to change the model's answers: what a half-trained or badly merged adapter is)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from loraserve.demo.assets import BASE_MODEL_NAME, MODEL_CACHE_NAME, ensure_model
from loraserve.demo.recipes import SERVED
from loraserve.demo.sample import SAMPLE_QUESTION

STARTUP_TIMEOUT_S = 300.0
RANDOM_ADAPTER = "random16"
"""Rank 8 on every linear layer, PEFT's random init (`init_lora_weights=False`), alpha 16."""


@dataclass
class DemoServer:
    url: str
    client: openai.OpenAI
    models: list[str]
    """The base model's name, the trained adapters', the random one's."""


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """loraserve's cache root for this session (`$XDG_CACHE_HOME/loraserve` of the server
    the tests start), holding the converted model."""
    root = tmp_path_factory.getbasetemp() / "xdg-cache" / "loraserve"
    ensure_model(root, progress=lambda _: None)
    return root


@pytest.fixture(scope="session")
def random_adapter(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("demo-adapters") / RANDOM_ADAPTER
    base = AutoModelForCausalLM.from_pretrained(cache_dir / MODEL_CACHE_NAME, dtype=torch.float32)
    torch.manual_seed(0)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=8, lora_alpha=16, target_modules=modules, init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def demo(cache_dir: Path, random_adapter: Path) -> Iterator[DemoServer]:
    """`loraserve demo` on a free port, once it has printed its sample exchange."""
    port = _free_port()
    command = [sys.executable, "-P", "-m", "loraserve.server.cli", "demo", "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--adapter", f"{RANDOM_ADAPTER}={random_adapter}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "XDG_CACHE_HOME": str(cache_dir.parent), "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout or []), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    try:
        client = _wait_for_client(url, process, lines)
        trained = [BASE_MODEL_NAME, *SERVED]
        _wait_for_sample(trained, process, lines)
        yield DemoServer(url, client, [*trained, RANDOM_ADAPTER])
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
        reader.join(10)


def _wait_for_sample(models: list[str], process: subprocess.Popen[str], lines: list[str]) -> None:
    """Until the demo has printed its sample exchange: a line per model after the header."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        printed = "".join(lines)
        _, header, exchange = printed.partition(f"Asked {SAMPLE_QUESTION!r}, greedy:\n")
        if header and all(
            re.search(rf"^ *{re.escape(model)}: \S", exchange, re.MULTILINE) for model in models
        ):
            return
        assert process.poll() is None and "no sample exchange" not in printed, printed
        time.sleep(0.5)
    raise AssertionError("no sample exchange:\n" + "".join(lines))


def _wait_for_client(url: str, process: subprocess.Popen[str], lines: list[str]) -> openai.OpenAI:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, "".join(lines)
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("the demo did not start:\n" + "".join(lines))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
