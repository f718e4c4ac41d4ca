"""The disk tier and the residency metrics, from a live server.

The server lists an adapter dir (read nothing), keeps one adapter pinned, holds one
idle adapter in host RAM (--max-cpu-loras 1) and has two adapter slots in its pool. A
sequence of requests and load calls moves adapters between the tiers; after each, the
`vllm:lora_adapter_loaded` series scraped from /metrics name exactly the adapters in
each tier, and the counts agree. A pin that would take the last slot is refused. A broken folder in the dir fails its requests with a
400 that names the adapter, not its folder, and is not read again."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator

import pytest
from server_harness import Assets, ServerThread, metric

from loraserve.engine.client.async_engine import AsyncEngine
from loraserve.engine.core.config import build_config
from loraserve.server.app import create_app
from loraserve.server.config import ServerConfig

LOADED = re.compile(r"^vllm:lora_adapter_loaded\{(.*)\} 1\.0$", re.MULTILINE)


@pytest.fixture(scope="module")
def server(assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    folder = tmp_path_factory.mktemp("tiers")
    for name in ("mlp4", "all6"):
        shutil.copytree(assets.adapter_dir / name, folder / "dir" / name)
    broken = shutil.copytree(assets.adapter_dir / "mlp4", folder / "dir" / "broken")
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    options = dict(device="cpu", pool_pages=96, max_cpu_loras=1, max_resident_adapters=2)
    engine = AsyncEngine(
        build_config(str(assets.model), **options),
        {"attn8": assets.adapter_dir / "attn8"},
        pinned=["attn8"],
        adapter_dir=str(folder / "dir"),
    )
    config = ServerConfig(
        adapter_dir=str(folder / "dir"), allowed_adapter_roots=(str(assets.spare_dir),)
    )
    thread = ServerThread(create_app(engine, config))
    yield thread
    thread.stop()


def residency(server: ServerThread) -> tuple[dict[str, tuple[str, str]], str]:
    """{adapter: (level, pinned)} of the residency series, and the whole exposition."""
    with server.http() as http:
        text = http.get("/metrics").text
    loaded = {}
    for match in LOADED.finditer(text):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        assert labels["model_name"] == "tiny-llama" and int(labels["rank"]) > 0
        loaded[labels["adapter_name"]] = (labels["level"], labels["pinned"])
    return loaded, text


def complete(server: ServerThread, model: str) -> None:
    server.client().completions.create(model=model, prompt="hello", max_tokens=3, temperature=0)


def check(server: ServerThread, expected: dict[str, tuple[str, str]], num_cpu: int) -> str:
    loaded, text = residency(server)
    assert loaded == expected
    num_gpu = sum(level == "gpu" for level, _ in expected.values())
    assert metric(text, "vllm:num_gpu_loaded_lora_adapters") == num_gpu
    assert metric(text, "vllm:num_cpu_loaded_lora_adapters") == num_cpu
    assert metric(text, "vllm:max_gpu_lora_adapters") == 2
    assert "vllm:lora_requests_info{" in text  # still there: the llm-d router reads it
    return text


def test_residency_series_follow_loads_evictions_pins_and_host_evictions(
    server: ServerThread, assets: Assets
) -> None:
    pinned, idle = ("gpu", "true"), ("gpu", "false")
    models = {card.id for card in server.client().models.list().data}
    assert {"attn8", "mlp4", "all6", "broken"} <= models  # listed, none read but attn8
    check(server, {"attn8": pinned}, num_cpu=1)
    complete(server, "mlp4")  # read from disk; the idle attn8 leaves host RAM (budget 1)
    check(server, {"attn8": pinned, "mlp4": idle}, num_cpu=1)
    complete(server, "all6")  # the second slot: mlp4 leaves the pool, and host RAM
    check(server, {"attn8": pinned, "all6": idle}, num_cpu=1)
    with server.http() as http:
        body = {"lora_name": "extra", "lora_path": str(assets.spare_dir / "extra")}
        assert http.post("/v1/load_lora_adapter", json=body).status_code == 200
        check(server, {"attn8": pinned, "all6": idle, "extra": ("cpu", "false")}, num_cpu=1)
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "extra"}).status_code == 200
        check(server, {"attn8": pinned, "all6": idle}, num_cpu=0)
        body["pinned"] = True  # the last slot: pinning it would starve every other adapter
        response = http.post("/v1/load_lora_adapter", json=body)
        assert response.status_code == 400 and "slots" in response.json()["error"]["message"]
    text = check(server, {"attn8": pinned, "all6": idle}, num_cpu=0)  # no trace of it
    assert metric(text, "vllm:lora_adapter_load_seconds_count", transition="load") == 5
    assert metric(text, "vllm:lora_adapter_load_seconds_count", transition="activate") == 3


def test_a_broken_folder_is_a_400_naming_the_adapter_and_is_remembered(
    server: ServerThread,
) -> None:
    before, text = residency(server)
    reads = [metric(text, "vllm:lora_adapter_load_seconds_count", transition="load")]
    for _ in range(2):
        with server.http() as http:
            body = {"model": "broken", "prompt": "hello", "max_tokens": 2}
            response = http.post("/v1/completions", json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["param"], error["code"]) == ("model", "invalid_adapter")
        assert "'broken'" in error["message"] and "safetensors" in error["message"]
        assert "/dir/" not in error["message"]  # the folder is not named
        loaded, text = residency(server)
        assert loaded == before
        reads.append(metric(text, "vllm:lora_adapter_load_seconds_count", transition="load"))
    assert reads[1] == reads[0] + 1 and reads[2] == reads[1]  # read once, then remembered
    complete(server, "mlp4")  # the others still serve
