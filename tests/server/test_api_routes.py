"""The routes and habits vLLM users script against: a model by id (`models.retrieve`),
/tokenize and /detokenize, /version, /ping, /docs, CORS, 415 for a body not declared
JSON, `model` optional, and unloading an adapter with requests in flight (new requests
refused at once, those in flight finish, then it is gone)."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from server_harness import Assets, Running, metric, start_server

from loraserve.server.cli import build_parser
from loraserve.server.cli_aliases import apply_vllm_aliases


def test_models_retrieve_and_optional_model(running: Running) -> None:
    client = running.server.client()
    card = client.models.retrieve("attn8")
    assert card.id == "attn8" and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    with running.server.http() as http:
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        answer = http.post("/v1/chat/completions", json=chat).json()
    assert answer["model"] == running.app.state.served.base_model


def test_tokenize_and_detokenize(running: Running) -> None:
    tokenizer = running.engine.tokenizer
    with running.server.http() as http:
        tokens = http.post("/tokenize", json={"prompt": "hello world"}).json()
        assert tokens["tokens"] == tokenizer.encode("hello world")
        assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] > 0
        chat = {"messages": [{"role": "user", "content": "hi"}], "return_token_strs": True}
        rendered = http.post("/tokenize", json=chat).json()
        expected = tokenizer.encode(
            tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]),
            add_special_tokens=False,
        )
        assert rendered["tokens"] == expected and len(rendered["token_strs"]) == len(expected)
        text = http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
        assert text == "hello world"
        assert http.post("/detokenize", json={"tokens": [10**6]}).status_code == 400


def test_version_ping_docs(running: Running) -> None:
    with running.server.http() as http:
        assert http.get("/version").json()["version"]
        assert http.get("/ping").status_code == 200
        assert http.post("/ping").status_code == 200
        assert "swagger" in http.get("/docs").text.lower()
        assert http.get("/openapi.json").status_code == 200


def test_a_body_not_declared_json_is_415(running: Running) -> None:
    body = b'{"model": "attn8", "prompt": "hi"}'
    with running.server.http() as http:
        for headers in ({}, {"content-type": "application/x-www-form-urlencoded"}):
            response = http.post("/v1/completions", content=body, headers=headers)
            assert response.status_code == 415
            assert response.json()["error"]["code"] == "unsupported_media_type"
        ok = http.post(
            "/v1/completions",
            content=body,
            headers={"content-type": "application/json; charset=utf-8"},
        )
        assert ok.status_code == 200


@pytest.fixture(scope="module")
def cors(assets: Assets) -> Iterator[Running]:
    server = start_server(assets, allowed_origins=('["https://app.example"]',))
    yield server
    server.server.stop()


def test_cors_answers_preflights_for_allowed_origins(cors: Running, running: Running) -> None:
    preflight = {
        "origin": "https://app.example",
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type, authorization",
    }
    with cors.server.http() as http:
        allowed = http.options("/v1/chat/completions", headers=preflight)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        other = http.options(
            "/v1/chat/completions", headers={**preflight, "origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in other.headers
    with running.server.http() as http:  # no --allowed-origins: no CORS at all
        assert (
            "access-control-allow-origin"
            not in http.options("/v1/models", headers=preflight).headers
        )


def test_vllm_metric_names_carry_the_model_name(running: Running) -> None:
    running.server.client().completions.create(model="mlp4", prompt="hi", max_tokens=3)
    with running.server.http() as http:
        text = http.get("/metrics").text
    name = running.app.state.served.base_model
    for series in (
        "vllm:time_to_first_token_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:time_per_output_token_seconds_count",
    ):
        assert metric(text, series, model_name=name) >= 1, series
    assert metric(text, "vllm:generation_tokens_total", model_name=name) >= 3
    assert metric(text, "vllm:prompt_tokens_total", model_name=name) >= 1
    assert (
        metric(text, "vllm:request_success_total", model_name=name, finished_reason="length") >= 1
    )


def test_vllm_request_histograms_count_each_completion(running: Running) -> None:
    """One prompt, n=2, 5 tokens each: two completions' queue, prefill, decode times and token
    counts, one prompt's longest completion, 2 x 4 gaps between tokens."""
    name = running.app.state.served.base_model
    counted = (
        "vllm:request_queue_time_seconds_count",
        "vllm:request_prefill_time_seconds_count",
        "vllm:request_decode_time_seconds_count",
        "vllm:request_inference_time_seconds_count",
        "vllm:request_prompt_tokens_count",
        "vllm:request_generation_tokens_count",
        "vllm:request_max_num_generation_tokens_count",
        "vllm:inter_token_latency_seconds_count",
        "vllm:request_generation_tokens_sum",
        "vllm:request_max_num_generation_tokens_sum",
    )

    def read() -> dict[str, float]:
        with running.server.http() as http:
            text = http.get("/metrics").text
        return {series: metric(text, series, model_name=name) for series in counted}

    before = read()
    running.server.client().completions.create(
        model=name, prompt="hello there", max_tokens=5, n=2, extra_body={"ignore_eos": True}
    )
    grown = {series: value - before[series] for series, value in read().items()}
    assert grown == {
        **dict.fromkeys(counted[:6], 2),
        "vllm:request_max_num_generation_tokens_count": 1,
        "vllm:inter_token_latency_seconds_count": 8,
        "vllm:request_generation_tokens_sum": 10,
        "vllm:request_max_num_generation_tokens_sum": 5,
    }


def test_engine_steps_are_timed_one_observation_each(running: Running) -> None:
    """A lone request of 5 tokens runs 5 steps (its prefill samples the first): 5 step times."""

    def read() -> tuple[float, float]:
        with running.server.http() as http:
            text = http.get("/metrics").text
        count = metric(text, "loraserve_engine_step_seconds_count")
        return count, metric(text, "loraserve_engine_step_seconds_sum")

    count, total = read()
    running.server.client().completions.create(
        model=running.app.state.served.base_model,
        prompt="hello there",
        max_tokens=5,
        extra_body={"ignore_eos": True},
    )
    grown_count, grown_total = read()
    assert grown_count - count == 5
    assert grown_total > total


def test_vllm_cli_spellings_are_accepted() -> None:
    args = vars(build_parser().parse_args([
        "serve", "--model", "m", "--enable-lora", "--lora-modules", "a=/x", '{"name": "b", "path": "/y"}',
        "--max-loras", "4", "--max-lora-rank", "16", "--max-cpu-loras", "8", "--served-model-name", "base",
    ]))  # fmt: skip
    apply_vllm_aliases(args)
    assert args["adapters"] == ["a=/x", "b=/y"]
    assert args["max_resident_adapters"] == 4 and args["max_lora_rank"] == 16
    assert args["max_cpu_loras"] == 8  # loraserve's own option, spelled as vLLM's
    assert args["served_model_name"] == ["base"] and "enable_lora" not in args


def test_unloading_an_adapter_in_use_refuses_new_requests_then_forgets_it(
    running: Running, assets: Assets
) -> None:
    client = running.server.client()
    with running.server.http() as http:
        load = {"lora_name": "extra", "lora_path": str(assets.spare_dir / "extra")}
        assert http.post("/v1/load_lora_adapter", json=load).status_code == 200
        stream = client.completions.create(
            model="extra",
            prompt="hello",
            max_tokens=120,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = iter(stream)
        next(chunks)  # running
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "extra"}).status_code == 200
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="extra", prompt="hi", max_tokens=2)
        finished = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
        assert finished[-1] == "length"  # the request in flight finished as asked
        assert "extra" not in [card.id for card in client.models.list()]
        assert http.post("/v1/load_lora_adapter", json=load).status_code == 200  # free again
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "extra"}).status_code == 200


def test_null_means_the_default_where_openai_allows_it(running: Running) -> None:
    nulls = {"n": None, "stream": None, "echo": None, "logprobs": None, "temperature": None}
    with running.server.http() as http:
        completion = http.post("/v1/completions", json={"model": "attn8", "prompt": "hi", **nulls})
        assert completion.status_code == 200, completion.text
        chat = {"model": "attn8", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        streamed = {
            **chat,
            "stream": True,
            "stream_options": {"include_usage": None},
            "logprobs": None,
        }
        response = http.post("/v1/chat/completions", json={**streamed, "n": None})
        assert response.status_code == 200 and '"usage"' not in response.text
