"""Locust load test of an OpenAI-compatible server: streamed chat calls over many adapters.

    locust -f bench/locustfile.py --headless -u 32 -r 8 -t 2m --host http://127.0.0.1:8000

Locust monkey-patches sockets (gevent) on import: run it as its own process only,
never import this file from tests or from other benchmarks.

At test start the model list comes from `GET /v1/models`: the adapters are the
entries with a `parent`, sorted by name. Each call picks one by S-LoRA's power law,
index = floor(n * U ** (1 / alpha)) (alpha = 1 uniform, smaller favours the first
names). The base model is not called unless `LORASERVE_INCLUDE_BASE=1` (then it is
one more entry, after the adapters) or the server has no adapter at all.

Each call is `POST /v1/chat/completions`, streamed, with a short random ASCII
message of a few words (any text does; short ones keep calls alike). It fails
on a status other than 200, an error event in the stream, a stream without
`[DONE]`, or no content. Locust's time for it is the whole stream; the time to the
first token (the first chunk with content or a finish reason, not the opening role
chunk) is reported as its own entry, of type `TTFT`.

Environment: LORASERVE_ALPHA (default 1), LORASERVE_INCLUDE_BASE (0), LORASERVE_MAX_TOKENS
(32), LORASERVE_SEED (0), LORASERVE_API_KEY (sent as a bearer token when set).
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from typing import Any, cast

import requests
from locust import HttpUser, between, events, stats, task
from locust.env import Environment
from locust.exception import StopUser

ALPHA = float(os.environ.get("LORASERVE_ALPHA", "1"))
INCLUDE_BASE = os.environ.get("LORASERVE_INCLUDE_BASE", "0") == "1"
MAX_TOKENS = int(os.environ.get("LORASERVE_MAX_TOKENS", "32"))
API_KEY = os.environ.get("LORASERVE_API_KEY")
MAX_MESSAGE_CHARS = 24
WORDS = (
    *("hello", "world", "good", "morning", "how", "are", "you", "today", "the", "cat"),
    *("sat", "on", "a", "mat", "blue", "sky", "rain", "coffee", "please", "thanks"),
    *("night", "code", "python", "tiny", "model", "lora", "serve", "many", "adapters"),
)
CHAT_PATH = "/v1/chat/completions"
TIMEOUT_S = (10, 300)
"""(connect, read) timeouts of one call; a call slower than this counts as failed."""

MODELS: list[str] = []
"""The models called, most popular first under alpha < 1; filled at test start."""
RANDOM = random.Random(int(os.environ.get("LORASERVE_SEED", "0")))


def headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}


def models_to_call(listing: list[dict[str, Any]]) -> list[str]:
    """Adapters (entries with a parent) by name; the base model too when asked or alone."""
    adapters = sorted(entry["id"] for entry in listing if entry.get("parent"))
    bases = [entry["id"] for entry in listing if not entry.get("parent")]
    return adapters + bases if INCLUDE_BASE or not adapters else adapters


@events.test_start.add_listener
def fetch_models(environment: Environment, **_: Any) -> None:
    response = requests.get(f"{environment.host}/v1/models", headers=headers(), timeout=30)
    response.raise_for_status()
    MODELS[:] = models_to_call(response.json()["data"])
    print(f"calling {len(MODELS)} models, alpha {ALPHA}: {', '.join(MODELS[:8])}", flush=True)


@events.quitting.add_listener
def print_summary_beside_json_file(environment: Environment, **_: Any) -> None:
    """Locust prints no text summary when it writes `--json-file`; print it anyway, so
    that one run leaves both (from the stats as the run ends, just before the JSON)."""
    options = environment.parsed_options
    if environment.runner is None or not getattr(options, "json_file", None):
        return
    stats.print_stats(environment.runner.stats, current=False)
    stats.print_percentile_stats(environment.runner.stats)
    stats.print_error_report(environment.runner.stats)


def pick_model() -> str:
    """S-LoRA's power law over MODELS: P(index < k) = (k / n) ** alpha."""
    index = int(len(MODELS) * RANDOM.random() ** (1 / ALPHA))
    return MODELS[min(index, len(MODELS) - 1)]


def random_message() -> str:
    words = RANDOM.choices(WORDS, k=RANDOM.randint(1, 3))
    return " ".join(words)[:MAX_MESSAGE_CHARS].strip()


@dataclass
class StreamOutcome:
    """What one streamed chat answer carried."""

    first_token_s: float | None = None
    """perf_counter() of the first chunk with content or a finish reason."""
    done: bool = False
    error: str | None = None
    bytes_read: int = 0


def read_stream(response: requests.Response) -> StreamOutcome:
    """Consume an SSE chat stream up to `[DONE]`."""
    outcome = StreamOutcome()
    for raw in response.iter_lines():
        outcome.bytes_read += len(raw) + 1
        line = raw.decode("utf-8", errors="replace")
        if not line.startswith("data:"):
            continue
        payload = line.removeprefix("data:").strip()
        if payload == "[DONE]":
            outcome.done = True
            break
        chunk = json.loads(payload)
        if "error" in chunk:
            outcome.error = f"error event: {json.dumps(chunk['error'])[:300]}"
            break
        for choice in chunk.get("choices") or []:
            text = (choice.get("delta") or {}).get("content") or ""
            if outcome.first_token_s is None and (text or choice.get("finish_reason")):
                outcome.first_token_s = time.perf_counter()
    return outcome


def failure_reason(outcome: StreamOutcome) -> str | None:
    if outcome.error is not None:
        return outcome.error
    if not outcome.done:
        return "the stream ended without [DONE]"
    if outcome.first_token_s is None:
        return "the stream carried no token"
    return None


class ChatUser(HttpUser):
    """One client at a time: a streamed chat call, then up to a second of thought."""

    wait_time = between(0.0, 1.0)

    def on_start(self) -> None:
        if not MODELS:  # GET /v1/models failed at test start; locust logged why
            raise StopUser()

    @task
    def chat(self) -> None:
        model = pick_model()
        body = {
            "model": model,
            "messages": [{"role": "user", "content": random_message()}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        start = time.perf_counter()
        with self.client.post(
            CHAT_PATH,
            json=body,
            headers=headers(),
            stream=True,
            catch_response=True,
            timeout=TIMEOUT_S,
        ) as response:
            if response.status_code != 200:  # 0: no answer at all (refused, timed out)
                detail = getattr(response, "error", None) or (response.text or "")[:300]
                response.failure(f"HTTP {response.status_code}: {detail}")
                return
            try:
                outcome = read_stream(response)
            except (requests.RequestException, ValueError) as error:
                response.failure(f"{type(error).__name__}: {error}")
                return
            # Locust timed the headers only (stream=True); report the whole answer.
            meta = cast("dict[str, Any]", response.request_meta)
            meta["response_time"] = (time.perf_counter() - start) * 1000
            meta["response_length"] = outcome.bytes_read
            reason = failure_reason(outcome)
            if reason is not None:
                response.failure(reason)
                return
            assert outcome.first_token_s is not None  # failure_reason checked it
            self.environment.events.request.fire(
                request_type="TTFT",
                name=CHAT_PATH,
                response_time=(outcome.first_token_s - start) * 1000,
                response_length=0,
                exception=None,
                context={"model": model},
            )
