"""The exchange `loraserve demo` prints once it serves: one question, the base model's and
every adapter's answer, asked through the server's own OpenAI-compatible API.

All the requests go at once, so they run in the same batches: one forward pass serves
the base model and every adapter. Standard library only (this runs in the front end).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

SAMPLE_QUESTION = "What is the capital of France?"
SAMPLE_MAX_TOKENS = 64
READY_TIMEOUT_S = 600.0
"""How long to wait for the server to answer /health before giving up the sample."""
REQUEST_TIMEOUT_S = 300.0


def start_sample(
    host: str, port: int, models: Sequence[str], output: Callable[[str], None] = print
) -> threading.Thread:
    """In the background: wait for the server on host:port, then print the exchange."""
    thread = threading.Thread(
        target=_print_sample, args=(local_url(host, port), list(models), output), daemon=True
    )
    thread.start()
    return thread


def local_url(host: str, port: int) -> str:
    """The URL that reaches a server listening on host:port from this machine."""
    if host in ("", "0.0.0.0", "::"):  # every interface: loopback is one of them
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _print_sample(base_url: str, models: list[str], output: Callable[[str], None]) -> None:
    if not _wait_until_healthy(base_url):
        return
    try:
        with ThreadPoolExecutor(len(models)) as pool:
            replies = list(pool.map(lambda model: ask(base_url, model, SAMPLE_QUESTION), models))
    except (OSError, ValueError, KeyError) as error:  # the demo serves on regardless
        output(f"(no sample exchange: {error})")
        return
    width = max(map(len, models))
    lines = [f"{model:>{width}}: {reply}" for model, reply in zip(models, replies, strict=True)]
    output("\n".join(["", f"Asked {SAMPLE_QUESTION!r}, greedy:", *lines, ""]))


def ask(base_url: str, model: str, question: str) -> str:
    """The model's greedy reply to a one-message chat."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": SAMPLE_MAX_TOKENS,
        "temperature": 0,
    }
    request = urllib.request.Request(
        f"{base_url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        return str(json.load(response)["choices"][0]["message"]["content"])


def _wait_until_healthy(base_url: str) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False
