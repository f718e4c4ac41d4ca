"""A real server over 2 tensor-parallel ranks (gloo, on the CPU): it serves what one device
serves, loads an adapter at run time, and a rank killed mid-stream ends the engine cleanly:
the stream gets an error event, later requests a 503, /health 503, nothing hangs."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from server_harness import Assets, Running, start_server

from loraserve import LLM, SamplingParams

pytestmark = pytest.mark.slow
LONG = dict(max_tokens=400, temperature=0.0, extra_body={"ignore_eos": True})


@pytest.fixture
def two_ranks(assets: Assets) -> Iterator[Running]:
    server = start_server(
        assets,
        engine_options={"tensor_parallel_size": 2},
        allowed_adapter_roots=(str(assets.spare_dir),),
    )
    yield server
    server.server.stop()


def worker_pids(core_pid: int) -> list[int]:
    """The engine-core process's children: its tensor-parallel workers."""
    children = Path(f"/proc/{core_pid}/task/{core_pid}/children").read_text().split()
    return [int(pid) for pid in children]


def test_two_ranks_serve_load_at_run_time_and_die_cleanly(two_ranks: Running, assets) -> None:
    client = two_ranks.server.client(timeout=60)
    with two_ranks.server.http() as http:
        loaded = http.post(
            "/v1/load_lora_adapter",
            json={"lora_name": "extra", "lora_path": str(assets.spare_dir / "extra")},
        )
        assert loaded.status_code == 200, loaded.text
    adapters = {"attn8": assets.adapters["attn8"], "extra": assets.spare_dir / "extra"}
    one_device = LLM(assets.model, adapters=adapters, device="cpu")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for model, adapter in (("attn8", "attn8"), ("extra", "extra"), ("tiny-llama", None)):
        answer = client.completions.create(
            model=model, prompt="hello world", max_tokens=12, temperature=0.0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        expected = one_device.generate(["hello world"], params, adapter=adapter, use_tqdm=False)
        assert answer.choices[0].text == expected[0].outputs[0].text, model

    process = two_ranks.engine.client.process
    assert process is not None and process.pid is not None
    workers = worker_pids(process.pid)
    assert len(workers) == 1, "one worker: rank 1"
    stream = client.completions.create(model="attn8", prompt="a", stream=True, **LONG)
    chunks = iter(stream)
    next(chunks)  # the ranks are stepping
    os.kill(workers[0], signal.SIGKILL)
    with pytest.raises(openai.APIError, match="engine"):
        for _ in chunks:  # the error arrives as an SSE error event
            pass
    with pytest.raises(openai.InternalServerError) as later:
        client.completions.create(model="attn8", prompt="c", max_tokens=2)
    assert later.value.status_code == 503
    with two_ranks.server.http() as http:
        assert http.get("/health").status_code == 503
    process.join(timeout=30)
    assert not process.is_alive(), "the engine core exits once a rank is gone"
