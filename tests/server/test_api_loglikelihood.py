"""What lm-evaluation-harness's OpenAI-completions backend does for log-likelihood tasks,
against the server: prompts of context + continuation token ids, `echo`, `logprobs: 1`,
`max_tokens: 1`; the sum of the continuation's token logprobs and whether each was the
greedy choice, read as lm-eval reads them, equal PEFT's for every adapter."""

from __future__ import annotations

import pytest
import torch
from factories import peft_model_for
from server_harness import ADAPTERS, Assets, Running

REQUESTS = [  # (context, continuation)
    ("The quick brown fox", " jumps over the lazy dog"),
    ("SELECT name FROM", " users WHERE id = 42;"),
    ("Bonjour le", " monde"),
]


def lm_eval_payload(model: str, prompts: list[list[int]]) -> dict:
    """lm-eval's `OpenAICompletionsAPI._create_payload` for a log-likelihood request."""
    return {
        "model": model,
        "prompt": prompts,
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }


def lm_eval_parse(choice: dict, context_length: int) -> tuple[float, bool]:
    """lm-eval's `parse_logprobs`: the continuation's logprob sum and greediness."""
    logprobs = choice["logprobs"]
    token_logprobs = logprobs["token_logprobs"][context_length:-1]
    tokens = logprobs["tokens"][context_length:-1]
    tops = logprobs["top_logprobs"][context_length:-1]
    is_greedy = all(token == max(top, key=top.get) for token, top in zip(tokens, tops, strict=True))
    return sum(token_logprobs), is_greedy


@pytest.mark.parametrize("adapter", [None, *ADAPTERS])
def test_loglikelihoods_equal_peft(running: Running, assets: Assets, adapter: str | None) -> None:
    tokenizer = running.engine.tokenizer
    model = (
        assets.base_model
        if adapter is None
        else peft_model_for(assets.base_model, assets.adapters[adapter])
    )
    prompts, context_lengths = [], []
    for context, continuation in REQUESTS:
        context_ids = tokenizer.encode(context)
        prompts.append(context_ids + tokenizer.encode(continuation, add_special_tokens=False))
        context_lengths.append(len(context_ids))
    name = adapter or running.app.state.served.base_model
    with running.server.http() as http:
        response = http.post("/v1/completions", json=lm_eval_payload(name, prompts))
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    for prompt, context_length, choice in zip(prompts, context_lengths, choices, strict=True):
        loglikelihood, is_greedy = lm_eval_parse(choice, context_length)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt])).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)  # [len(prompt), vocab]
        positions = range(context_length, len(prompt))
        expected = sum(logprobs[p - 1, prompt[p]].item() for p in positions)
        greedy = all(int(logprobs[p - 1].argmax()) == prompt[p] for p in positions)
        assert loglikelihood == pytest.approx(expected, abs=1e-3)
        assert is_greedy == greedy
        assert choice["logprobs"]["token_logprobs"][0] is None  # nothing predicts token 0
        assert len(choice["logprobs"]["tokens"]) == len(prompt) + 1


def test_echo_without_generating(running: Running) -> None:
    """max_tokens 0 with echo: the prompt and its logprobs, nothing generated (OpenAI's old
    way, which some harnesses still use)."""
    body = {"model": "attn8", "prompt": "hello world", "max_tokens": 0, "echo": True, "logprobs": 0}
    with running.server.http() as http:
        answer = http.post("/v1/completions", json=body).json()
    choice = answer["choices"][0]
    assert choice["text"] == "hello world"
    assert len(choice["logprobs"]["tokens"]) == answer["usage"]["prompt_tokens"]
    assert answer["usage"]["completion_tokens"] == 0
