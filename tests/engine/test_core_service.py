"""`CoreService`, driven in-process as `LLM` drives it (`InprocClient`): a request with an
output constraint waits for its grammar on the compiling thread, outside the core (the
steps of others go on), is queued once compiled and then answered; aborted meanwhile, it
is never queued nor answered; a grammar that does not compile is answered with its error."""

from __future__ import annotations

from typing import Any

import pytest
from factories import make_model

from loraserve.engine.client.inproc_client import InprocClient
from loraserve.engine.core import ipc
from loraserve.engine.core.config import build_config
from loraserve.engine.core.request import EngineRequest
from loraserve.engine.core.sampling_params import SamplingParams
from loraserve.engine.sampling.structured import StructuredOutputs

CHOICE = SamplingParams(
    max_tokens=8, temperature=0.0, structured_outputs=StructuredOutputs(choice=["yes", "no"])
)
PLAIN = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("service") / "model"
    make_model(folder, "llama", seed=3, all_bytes=False)
    return folder


def run(client: InprocClient, heard: list[Any], turns: int = 200) -> None:
    for _ in range(turns):
        if not client.has_unfinished_requests():
            return
        client.run_turn()
    raise AssertionError(f"still unfinished after {turns} turns: {heard}")


def test_a_constrained_request_is_queued_once_compiled_and_others_step_meanwhile(model) -> None:
    heard: list[Any] = []
    client = InprocClient(build_config(str(model), device="cpu"), {}, heard.append)
    client.send(ipc.AddRequest(1, [EngineRequest("plain", [5, 6], PLAIN)]))
    client.send(ipc.AddRequest(2, [EngineRequest("choice", [5, 6], CHOICE)]))
    assert heard == [ipc.CallResult(1)]  # the plain one is queued at once
    assert "choice" not in client.core.requests and client.has_unfinished_requests()
    run(client, heard)
    answers = [m for m in heard if isinstance(m, ipc.CallResult)]
    assert answers == [ipc.CallResult(1), ipc.CallResult(2)]
    outputs = [o for m in heard if isinstance(m, ipc.Outputs) for o in m.outputs]
    tokens = [t for o in outputs if o.request_id == "choice" for t in o.new_token_ids]
    assert client.core.tokenizer.decode(tokens).strip() in ("yes", "no")
    assert len([t for o in outputs if o.request_id == "plain" for t in o.new_token_ids]) == 8


def test_aborted_while_compiling_it_is_never_queued_nor_answered(model) -> None:
    heard: list[Any] = []
    client = InprocClient(build_config(str(model), device="cpu"), {}, heard.append)
    client.send(ipc.AddRequest(7, [EngineRequest("gone", [5, 6], CHOICE)]))
    client.send(ipc.Abort(["gone"]))
    assert not client.has_unfinished_requests()
    for _ in range(5):
        client.run_turn()
    assert heard == [] and not client.core.requests
    client.send(
        ipc.AddRequest(
            8,
            [
                EngineRequest(
                    "bad",
                    [5],
                    SamplingParams(max_tokens=2, structured_outputs=StructuredOutputs(regex="a(")),
                )
            ],
        )
    )
    run(client, heard)
    assert len(heard) == 1 and heard[0].call_id == 8 and heard[0].error[0] == "invalid_request"
    assert client.core.memory.num_kv_pages == 0
