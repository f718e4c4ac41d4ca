"""Schema fuzzing of the generation routes against a real server (uvicorn on 127.0.0.1 over
the tiny model): schemathesis draws bodies from the server's own OpenAPI schema, valid
ones and invalid ones, with `model` set to a served adapter or to the base model (so that
they reach the engine instead of a 404). No answer may be a 5xx, and afterwards the
engine is healthy and answers a normal request as it did before.

Bounded for CI (about 30 s on 2 cores): 150 examples per route and model (300 per
model), drawn deterministically (`derandomize`), and a short context so that any accepted
request ends quickly. Most draws are refused (400) by some field; a third or so reach
the engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from server_harness import Assets, Running, start_server

from loraserve.server.limits import RequestLimits

ROUTES = ("/v1/completions", "/v1/chat/completions")
EXAMPLES_PER_ROUTE_AND_MODEL = 150
NORMAL = {"prompt": "hello", "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def running(assets: Assets) -> Iterator[Running]:
    server = start_server(
        assets,
        engine_options={"max_model_len": 64, "max_num_seqs": 16},
        limits=RequestLimits(max_n=2, max_prompts_per_request=4, max_stop_token_ids=16),
    )
    yield server
    server.server.stop()


def strategies(url: str) -> dict[str, Any]:
    """Route -> a strategy of cases, valid and invalid bodies alike."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    found = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path in ROUTES and operation.method.upper() == "POST":
            found[operation.path] = st.one_of(
                operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
                operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
            )
    assert set(found) == set(ROUTES)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("model", ["base", "attn8"])
@pytest.mark.parametrize("route", ROUTES)
def test_no_generated_body_gets_a_5xx(running: Running, route: str, model: str) -> None:
    url = running.server.url
    assert running.engine.info is not None
    name = running.engine.info.served_model_name if model == "base" else model
    with httpx.Client(base_url=url, timeout=60) as http:
        before = http.post("/v1/completions", json={"model": name, **NORMAL}).json()
    statuses: dict[int, int] = {}

    @settings(
        max_examples=EXAMPLES_PER_ROUTE_AND_MODEL,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategies(url)[route])
    def fuzz(case: Any) -> None:
        if isinstance(case.body, dict):
            case.body["model"] = name
        response = case.call(base_url=url, timeout=60)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, f"{response.status_code} {response.text[:300]}\n" + (
            case.as_curl_command()
        )

    fuzz()
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0, statuses  # both kinds ran
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/health").status_code == 200
        after = http.post("/v1/completions", json={"model": name, **NORMAL}).json()
    assert after["choices"][0]["text"] == before["choices"][0]["text"]
