"""Every error is OpenAI's error object with the right status, and the server goes on
answering afterwards. (Auth errors: test_api_tenants.py; queue full and engine
failure: test_api_overload.py.)"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from factories import make_adapter
from safetensors.torch import load_file, save_file
from server_harness import Assets, Running, start_server

BAD_ADAPTERS = ("missing-weights", "bad-config", "rank-too-high", "wrong-shapes", "dora-short-m")


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    """The response is `status` with an OpenAI error object; returns that object."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    return error  # type: ignore[no-any-return]


def assert_still_serving(running: Running, model: str = "attn8") -> None:
    response = running.server.client().completions.create(
        model=model, prompt="hello", max_tokens=2, temperature=0, extra_body={"ignore_eos": True}
    )
    assert response.usage is not None and response.usage.completion_tokens == 2


def post(running: Running, path: str, body: Any, **options: Any) -> httpx.Response:
    with running.server.http() as http:
        if not isinstance(body, dict):  # raw bytes, or an iterator of them (chunked)
            headers = {"content-type": "application/json"}
            return http.post(path, content=body, headers=headers, **options)
        return http.post(path, json=body, **options)


@pytest.fixture(scope="module")
def bad_adapters(assets: Assets) -> Path:
    """Broken PEFT folders under the spare root (where loading is allowed)."""
    root = assets.spare_dir
    good = root / "extra"
    (root / "missing-weights").mkdir(exist_ok=True)
    shutil.copy(good / "adapter_config.json", root / "missing-weights")
    shutil.copytree(good, root / "bad-config", dirs_exist_ok=True)
    (root / "bad-config" / "adapter_config.json").write_text("{not json")
    make_adapter(
        assets.base_model, root / "rank-too-high", r=32, lora_alpha=32, target_modules=["q_proj"]
    )
    shutil.copytree(good, root / "wrong-shapes", dirs_exist_ok=True)
    weights = root / "wrong-shapes" / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = next(key for key in tensors if "lora_A" in key)
    tensors[name] = tensors[name][:, :-1].contiguous()  # one input feature short
    save_file(tensors, weights)
    dora = root / "dora-short-m"  # a DoRA magnitude one output feature short
    make_adapter(
        assets.base_model, dora, r=4, lora_alpha=8, use_dora=True, target_modules=["o_proj"]
    )
    tensors = load_file(dora / "adapter_model.safetensors")
    name = next(key for key in tensors if "lora_magnitude_vector" in key)
    tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, dora / "adapter_model.safetensors")
    return root


@pytest.fixture(scope="module")
def running(assets: Assets) -> Iterator[Running]:
    """This module's server: a short context and a low rank limit, to hit both."""
    server = start_server(
        assets,
        engine_options={"max_lora_rank": 16, "max_model_len": 256},
        allowed_adapter_roots=(str(assets.spare_dir),),
        max_request_body_bytes=32 * 1024,
    )
    yield server
    server.server.stop()


def test_malformed_json_is_400(running: Running) -> None:
    error = assert_error(post(running, "/v1/completions", b'{"model": "attn8", "prompt": '), 400)
    assert "JSON" in error["message"]
    assert_still_serving(running)


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", "ten"), ("temperature", "hot"), ("n", True), ("prompt", {"a": 1})],
)
def test_wrong_types_are_400_not_422(running: Running, field: str, value: Any) -> None:
    body = {"model": "attn8", "prompt": "hello", field: value}
    assert_error(post(running, "/v1/completions", body), 400, field)
    assert_still_serving(running)


def test_missing_field_is_400(running: Running) -> None:
    error = assert_error(post(running, "/v1/chat/completions", {"model": "attn8"}), 400)
    assert error["param"] == "messages"
    assert_still_serving(running)


def test_unknown_model_is_404(running: Running) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        running.server.client().completions.create(model="nope", prompt="hello", max_tokens=2)
    assert caught.value.status_code == 404
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]
    assert_still_serving(running)


def test_prompt_longer_than_the_context_is_400_with_both_numbers(running: Running) -> None:
    tokenizer = running.engine.tokenizer
    prompt = "hello world " * 200
    num_tokens = len(tokenizer.encode(prompt))
    assert num_tokens > 256
    body = {"model": "mlp4", "prompt": prompt, "max_tokens": 4}
    error = assert_error(post(running, "/v1/completions", body), 400, "prompt")
    assert str(num_tokens) in error["message"] and "256" in error["message"]
    assert_still_serving(running)


def test_prompt_plus_max_tokens_above_the_context_is_400(running: Running) -> None:
    body = {"model": "mlp4", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 300}
    error = assert_error(post(running, "/v1/chat/completions", body), 400, "max_tokens")
    assert "256" in error["message"]
    assert_still_serving(running)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -1.0),
        ("top_p", 1.5),
        ("max_tokens", 0),
        ("n", 0),
        ("logprobs", 50),
        ("min_p", 2.0),
        ("top_k", -5),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 3.0),
        ("stop", [""]),
    ],
)
def test_bad_sampling_values_are_400(running: Running, field: str, value: Any) -> None:
    body = {"model": "attn8", "prompt": "hello", field: value}
    assert_error(post(running, "/v1/completions", body), 400, field)
    assert_still_serving(running)


def test_unsupported_fields_are_refused_not_ignored(running: Running) -> None:
    body = {"model": "attn8", "prompt": "hello", "use_beam_search": True}
    assert_error(post(running, "/v1/completions", body), 400, "use_beam_search")
    chat = {"model": "attn8", "messages": [{"role": "user", "content": "hi"}]}
    tools = [{"type": "function", "function": {"name": "f"}}]
    auto = {**chat, "tools": tools, "tool_choice": "auto"}  # no --tool-call-parser here
    assert_error(post(running, "/v1/chat/completions", auto), 400, "tool_choice")
    assert_error(
        post(running, "/v1/chat/completions", {**chat, "top_logprobs": 2}), 400, "top_logprobs"
    )
    assert_still_serving(running)


@pytest.mark.parametrize("chunked", [False, True])
def test_body_too_large_is_413(running: Running, chunked: bool) -> None:
    body = json.dumps({"model": "attn8", "prompt": "x" * 40_000}).encode()
    content: Any = iter([body[:1000], body[1000:]]) if chunked else body
    response = post(running, "/v1/completions", content)
    assert_error(response, 413)
    assert_still_serving(running)


def test_unknown_route_and_wrong_method_use_the_error_object(running: Running) -> None:
    with running.server.http() as http:
        assert_error(http.get("/v1/nothing"), 404)
        assert_error(http.get("/v1/completions"), 405)


# -- dynamic adapters ---------------------------------------------------------------------------


def test_load_use_and_unload_an_adapter(running: Running, assets: Assets) -> None:
    client = running.server.client()
    body = {"lora_name": "extra", "lora_path": str(assets.spare_dir / "extra")}
    response = post(running, "/v1/load_lora_adapter", body)
    assert response.status_code == 200, response.text
    models = {m.id: m for m in client.models.list().data}
    assert getattr(models["extra"], "parent", None) == running.engine.info.served_model_name
    assert_still_serving(running, "extra")
    response = post(running, "/v1/unload_lora_adapter", {"lora_name": "extra"})
    assert response.status_code == 200, response.text
    assert "extra" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="extra", prompt="hello", max_tokens=2)
    assert_error(post(running, "/v1/unload_lora_adapter", {"lora_name": "extra"}), 404)


def test_a_dora_adapter_loads_and_serves_beside_the_others(
    running: Running, assets: Assets
) -> None:
    make_adapter(
        assets.base_model,
        assets.spare_dir / "dora",
        seed=5,
        r=6,
        lora_alpha=12,
        use_dora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
    )
    body = {"lora_name": "dora", "lora_path": str(assets.spare_dir / "dora")}
    response = post(running, "/v1/load_lora_adapter", body)
    assert response.status_code == 200, response.text
    assert_still_serving(running, "dora")
    assert_still_serving(running)
    assert post(running, "/v1/unload_lora_adapter", {"lora_name": "dora"}).status_code == 200


def test_a_dora_magnitude_of_the_wrong_shape_says_so(running: Running, bad_adapters: Path) -> None:
    body = {"lora_name": "dora-bad", "lora_path": str(bad_adapters / "dora-short-m")}
    error = assert_error(post(running, "/v1/load_lora_adapter", body), 400)
    assert "dora-short-m" in error["message"] and "lora_magnitude_vector" in error["message"]
    assert "shape (63,), expected (64,)" in error["message"]


def test_a_relative_path_is_taken_under_the_root(running: Running) -> None:
    body = {"lora_name": "extra-relative", "lora_path": "extra"}
    assert post(running, "/v1/load_lora_adapter", body).status_code == 200
    assert_still_serving(running, "extra-relative")
    assert (
        post(running, "/v1/unload_lora_adapter", {"lora_name": "extra-relative"}).status_code == 200
    )


@pytest.mark.parametrize("folder", BAD_ADAPTERS)
def test_a_bad_adapter_is_400_and_the_others_still_serve(
    running: Running, bad_adapters: Path, folder: str
) -> None:
    body = {"lora_name": folder, "lora_path": str(bad_adapters / folder)}
    error = assert_error(post(running, "/v1/load_lora_adapter", body), 400)
    assert folder in error["message"] or "rank" in error["message"]
    assert folder not in {m.id for m in running.server.client().models.list().data}
    assert_still_serving(running)


def test_rank_above_the_limit_says_so(running: Running, bad_adapters: Path) -> None:
    body = {"lora_name": "big", "lora_path": str(bad_adapters / "rank-too-high")}
    error = assert_error(post(running, "/v1/load_lora_adapter", body), 400)
    assert "32" in error["message"] and "16" in error["message"]


def test_a_path_outside_the_roots_is_403(running: Running, assets: Assets, tmp_path: Path) -> None:
    shutil.copytree(assets.spare_dir / "extra", tmp_path / "outside")
    for path in (tmp_path / "outside", assets.spare_dir / ".." / "adapters" / "attn8"):
        body = {"lora_name": "sneaky", "lora_path": str(path)}
        assert_error(post(running, "/v1/load_lora_adapter", body), 403, "lora_path")
    link = assets.spare_dir / "link-out"
    link.symlink_to(tmp_path / "outside")
    try:
        body = {"lora_name": "sneaky", "lora_path": str(link)}
        assert_error(post(running, "/v1/load_lora_adapter", body), 403, "lora_path")
    finally:
        link.unlink()
    assert_still_serving(running)


def test_a_duplicate_name_is_400(running: Running, assets: Assets) -> None:
    body = {"lora_name": "attn8", "lora_path": str(assets.spare_dir / "extra")}
    error = assert_error(post(running, "/v1/load_lora_adapter", body), 400)
    assert "attn8" in error["message"]
    assert_still_serving(running, "attn8")


def test_an_adapter_name_unfit_for_metric_labels_is_400(running: Running, assets: Assets) -> None:
    body = {"lora_name": "a,b", "lora_path": str(assets.spare_dir / "extra")}
    assert_error(post(running, "/v1/load_lora_adapter", body), 400)
    assert_still_serving(running)
