"""What a hostile client found (issue 10), one test per defect: the request, its 4xx, and a
normal request answered right after on the same keep-alive connection.

Before the fix each of these stopped the engine for every tenant, froze the event loop,
grew without bound, or answered 500 and dropped the connection."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_harness import Assets, Running, start_server

from loraserve.errors import InvalidRequestError
from loraserve.server.app import create_app
from loraserve.server.config import ServerConfig

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def running(assets: Assets) -> Iterator[Running]:
    """This module's server: default request limits and body limit (1 MiB for this model)."""
    server = start_server(assets, allowed_adapter_roots=(str(assets.spare_dir),))
    yield server
    server.server.stop()


def send(http: httpx.Client, path: str, body: Any) -> httpx.Response:
    """POST a dict as JSON, or raw bytes/str as they are (JSON the json module would not write)."""
    if isinstance(body, dict):
        return http.post(path, json=body)
    return http.post(path, content=body, headers={"content-type": "application/json"})


def connection(response: httpx.Response) -> Any:
    return response.extensions["network_stream"].get_extra_info("client_addr")


def refused_then_served(
    http: httpx.Client, path: str, body: Any, status: int, param: str | None = None
) -> dict[str, Any]:
    """`body` gets `status` with an OpenAI error object naming `param`; then a normal request
    is answered on the same connection. Returns the error object."""
    response = send(http, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    normal = http.post(
        "/v1/completions", json={"model": "attn8", "prompt": "hello", "max_tokens": 2}
    )
    assert normal.status_code == 200 and normal.json()["usage"]["completion_tokens"] == 2
    assert connection(normal) == connection(response), "the connection was dropped"
    return error  # type: ignore[no-any-return]


# -- values the sampler could not compute -----------------------------------------------------


@pytest.mark.parametrize(
    ("field", "raw_value"),
    [
        ("top_k", str(2**63)),
        ("repetition_penalty", "1e-38"),
        ("temperature", "1e39"),
        ("temperature", "Infinity"),  # the json module reads it, and so did the server
        ("temperature", "NaN"),
        ("top_p", "-Infinity"),
        ("presence_penalty", "1e308"),
    ],
)
def test_values_the_sampler_cannot_compute_are_400(
    http: httpx.Client, field: str, raw_value: str
) -> None:
    body = f'{{"model": "attn8", "prompt": "hi", "min_tokens": 1, "{field}": {raw_value}}}'
    refused_then_served(http, "/v1/completions", body, 400, field)


def test_a_top_p_that_float32_rounds_to_zero_keeps_the_top_token(http: httpx.Client) -> None:
    body = {"model": "mlp4", "prompt": "hello", "max_tokens": 6, "min_tokens": 1}
    tiny = http.post("/v1/completions", json={**body, "top_p": 1e-50, "seed": 3}).json()
    greedy = http.post("/v1/completions", json={**body, "temperature": 0}).json()
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"]


def test_stop_token_ids_covering_the_vocabulary_before_min_tokens_are_400(
    http: httpx.Client, running: Running
) -> None:
    assert running.engine.info is not None
    everything = list(range(running.engine.info.vocab_size))
    body = {"model": "attn8", "prompt": "hi", "min_tokens": 1, "stop_token_ids": everything}
    refused_then_served(http, "/v1/completions", body, 400, "stop_token_ids")
    outside = {"model": "attn8", "prompt": "hi", "stop_token_ids": [len(everything)]}
    refused_then_served(http, "/v1/completions", outside, 400, "stop_token_ids")


# -- sizes and counts --------------------------------------------------------------------------


@pytest.mark.parametrize("n", [10**9, 20_000, 129])
def test_n_is_bounded(http: httpx.Client, n: int) -> None:
    body = {"model": "attn8", "prompt": "hi", "n": n, "max_tokens": 1}
    error = refused_then_served(http, "/v1/completions", body, 400, "n")
    assert "128" in error["message"]
    chat = {"model": "attn8", **CHAT, "n": n}
    refused_then_served(http, "/v1/chat/completions", chat, 400, "n")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stop", ["x"] * 65),
        ("stop", "y" * 1025),
        ("stop_token_ids", [3] * 1025),
        ("prompt", ["hi"] * 257),
        ("prompt", [[3, 4]] * 257),
    ],
)
def test_counts_above_the_request_limits_are_400(
    http: httpx.Client, field: str, value: Any
) -> None:
    body = {"model": "attn8", "prompt": "hi", "max_tokens": 1, field: value}
    refused_then_served(http, "/v1/completions", body, 400, field)


def test_a_5_mib_prompt_is_413_before_it_is_read(http: httpx.Client) -> None:
    body = json.dumps({"model": "attn8", "prompt": "hello " * (5 * 2**20 // 6)})
    refused_then_served(http, "/v1/completions", body, 413)


def test_a_text_the_context_cannot_hold_is_400_without_tokenizing(
    http: httpx.Client, running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = "hello " * 100_000  # 600 kB: under the body limit, over what 512 tokens hold
    chat = {"model": "attn8", "messages": [{"role": "user", "content": text}]}
    requests = [("/v1/completions", {"model": "attn8", "prompt": text}, "prompt")]
    requests.append(("/v1/chat/completions", chat, "messages"))
    for path, body, param in requests:
        with monkeypatch.context() as patch:
            patch.setattr(running.engine.tokenizer, "encode_at_most", None)  # unused
            response = http.post(path, json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and "characters" in error["message"]
    refused_then_served(http, "/v1/completions", {"model": "attn8", "prompt": text}, 400)


def test_a_long_token_list_is_400_by_its_length(http: httpx.Client) -> None:
    body = {"model": "attn8", "prompt": [10**6] * 100_000}  # out of vocabulary too
    error = refused_then_served(http, "/v1/completions", body, 400, "prompt")
    assert "100000 tokens" in error["message"]


def test_n_counts_against_the_waiting_queue(assets: Assets) -> None:
    server = start_server(assets, engine_options={"max_num_seqs": 1, "max_waiting_requests": 4})
    try:
        with server.server.http() as http:
            body = {"model": "attn8", "prompt": "hi", "max_tokens": 1, "n": 5}
            response = http.post("/v1/completions", json=body)
            assert response.status_code == 429 and response.json()["error"]["code"] == "queue_full"
            body["n"] = 4
            assert http.post("/v1/completions", json=body).status_code == 200
    finally:
        server.server.stop()


# -- 500s that dropped the connection -------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/completions", '{"model": "attn8", "prompt": "a\\ud800b"}', 400, "prompt"),
        ("/v1/completions", '{"model": "attn8", "prompt": ["ok", "\\udfff"]}', 400, "prompt"),
        (
            "/v1/chat/completions",
            '{"model": "attn8", "messages": [{"role": "user", "content": "\\ud83d"}]}',
            400,
            "messages",
        ),
        ("/v1/completions", '{"model": "\\ud800", "prompt": "hi"}', 404, "model"),
    ],
)
def test_lone_surrogates_are_4xx(
    http: httpx.Client, path: str, body: str, status: int, param: str
) -> None:
    refused_then_served(http, path, body, status, param)


def test_a_well_formed_surrogate_pair_is_served(http: httpx.Client) -> None:
    body = '{"model": "attn8", "prompt": "llama \\ud83e\\udd99", "max_tokens": 2}'
    assert send(http, "/v1/completions", body).status_code == 200


@pytest.fixture
def loop_link(assets: Assets) -> Iterator[Path]:
    link = assets.spare_dir / "loop"
    link.symlink_to(link)
    yield link
    link.unlink()


@pytest.mark.parametrize(
    ("lora_path", "status"),
    [
        ("extra\x00", 400),
        ("~nosuchuser/extra", 404),  # ~ is not expanded: a folder of that name, not found
        ("x" * 10_000, 400),
        ("loop", 400),
        ("loop/adapter", 400),
        ("a\udc80b", 400),
    ],
)
def test_odd_lora_paths_are_4xx(
    http: httpx.Client, loop_link: Path, lora_path: str, status: int
) -> None:
    body = json.dumps({"lora_name": "odd", "lora_path": lora_path})
    refused_then_served(http, "/v1/load_lora_adapter", body, status, "lora_path")


def test_a_lone_surrogate_in_an_adapter_name_is_400(http: httpx.Client, assets: Assets) -> None:
    body = json.dumps({"lora_name": "odd\ud800", "lora_path": str(assets.spare_dir / "extra")})
    refused_then_served(http, "/v1/load_lora_adapter", body, 400, "lora_name")


def test_an_unexpected_error_is_500_and_the_connection_survives(
    http: httpx.Client, running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: Any) -> Any:
        raise RuntimeError("injected")

    monkeypatch.setattr(running.app.state.served.prompts, "completion_prompts", broken)
    body = {"model": "attn8", "prompt": "hello"}
    response = http.post("/v1/completions", json=body)
    monkeypatch.undo()
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
    normal = http.post("/v1/completions", json={**body, "max_tokens": 2})
    assert normal.status_code == 200 and connection(normal) == connection(response)


# -- fields named as sent, and the same rule for both token limits ----------------------------


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/chat/completions", {"max_completion_tokens": 0}, "max_completion_tokens"),
        ("/v1/chat/completions", {"max_tokens": 0}, "max_tokens"),
        (
            "/v1/chat/completions",
            {"max_tokens": 3, "max_completion_tokens": 0},
            "max_completion_tokens",
        ),
        ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
        ("/v1/chat/completions", {"max_completion_tokens": 10**6}, "max_completion_tokens"),
    ],
)
def test_errors_name_the_field_as_sent(
    http: httpx.Client, path: str, extra: dict[str, Any], param: str
) -> None:
    prompt = {"prompt": "hi"} if path == "/v1/completions" else CHAT
    error = refused_then_served(http, path, {"model": "attn8", **prompt, **extra}, 400, param)
    first_word = error["message"].split()[0]
    assert first_word == param or first_word not in ("max_tokens", "logprobs"), error


@pytest.mark.parametrize(
    ("body", "words"),
    [(b"[1, 2]", "JSON object"), (b"", "missing"), (b'"text"', "JSON object")],
)
def test_whole_body_errors_say_what_is_wrong(http: httpx.Client, body: bytes, words: str) -> None:
    error = refused_then_served(http, "/v1/chat/completions", body, 400)
    assert words in error["message"] and not error["message"].startswith(":")


# -- adapters and the base model's name --------------------------------------------------------


def test_an_adapter_may_not_take_the_base_models_name(
    http: httpx.Client, running: Running, assets: Assets
) -> None:
    assert running.engine.info is not None
    base = running.engine.info.served_model_name
    body = {"lora_name": base, "lora_path": str(assets.spare_dir / "extra")}
    refused_then_served(http, "/v1/load_lora_adapter", body, 400, "lora_name")
    assert [card["id"] for card in http.get("/v1/models").json()["data"]].count(base) == 1


def test_an_adapter_named_like_the_base_model_fails_the_start(assets: Assets) -> None:
    from loraserve.engine.client.async_engine import AsyncEngine
    from loraserve.engine.core.config import build_config

    config = build_config(str(assets.model), device="cpu", pool_pages=32, served_model_name="attn8")
    engine = AsyncEngine(config, assets.adapters)
    try:
        with pytest.raises(InvalidRequestError, match="base model"):
            create_app(engine, ServerConfig())
    finally:
        engine.shutdown()


# -- the schema is what the server sends --------------------------------------------------------


def test_the_openapi_schema_documents_400_not_422(http: httpx.Client) -> None:
    schema = http.get("/openapi.json").json()
    assert '"422"' not in json.dumps(schema)
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = schema["paths"][path]["post"]["responses"]
        assert responses["400"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"
        }
    metrics = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    prompt = schema["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]
    assert len(prompt["oneOf"]) == 4
