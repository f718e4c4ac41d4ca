"""The real demo, built from the package as `make demo` builds it (the GGUF conversion
included, once per test session): loraserve, transformers and PEFT run the same model,
and through the real server each adapter does what it is trained for on questions it
never saw, while the base model does not.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from demo_harness import DemoServer
from factories import greedy_reference

from loraserve import LLM, SamplingParams
from loraserve.demo.assets import BASE_MODEL_NAME, MODEL_CACHE_NAME, adapter_folders
from loraserve.demo.lora_training import chat_prompt_ids
from loraserve.demo.questions import HELD_OUT_QUESTIONS
from loraserve.demo.recipes import SERVED
from loraserve.demo.sample import SAMPLE_QUESTION
from loraserve.models.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

QUESTIONS = HELD_OUT_QUESTIONS[::5]  # eight, of eight kinds, France's capital first
MIN_PASSED = len(QUESTIONS) - 2  # "most": a 135M model slips now and then
MAX_TOKENS = 96  # enough for a whole JSON object of a trimmed answer


def test_the_converted_model_is_a_plain_hugging_face_folder(cache_dir: Path) -> None:
    from transformers import AutoTokenizer

    folder = cache_dir / MODEL_CACHE_NAME
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chat = [{"role": "user", "content": SAMPLE_QUESTION}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    ours = Tokenizer.from_folder(folder)
    expected_ids = tokenizer(text, add_special_tokens=False).input_ids
    assert chat_prompt_ids(ours, SAMPLE_QUESTION) == expected_ids
    assert ours.eos_token_ids == (tokenizer.convert_tokens_to_ids("<|im_end|>"),)


def test_loraserve_equals_transformers_and_peft(cache_dir: Path) -> None:
    """Greedy tokens equal and logprobs within 1e-4 in float32, base and every adapter,
    all in one batch on loraserve's side."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, adapters = cache_dir / MODEL_CACHE_NAME, adapter_folders()
    llm = LLM(folder, adapters=adapters, device="cpu", dtype="float32")
    names: list[str | None] = [None, *adapters]
    prompt = chat_prompt_ids(llm.tokenizer, SAMPLE_QUESTION)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=5)
    outputs = llm.generate(
        prompt_token_ids=[prompt] * len(names), sampling_params=params, adapter=names
    )
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    first, *others = adapters
    reference = PeftModel.from_pretrained(base, str(adapters[first]), adapter_name=first).eval()
    for name in others:
        reference.load_adapter(str(adapters[name]), adapter_name=name)
    for name, output in zip(names, outputs, strict=True):
        if name is None:
            with reference.disable_adapter():
                tokens, logits = greedy_reference(reference, prompt, 6)
        else:
            reference.set_adapter(name)
            tokens, logits = greedy_reference(reference, prompt, 6)
        assert output.token_ids == tokens, name
        expected = torch.log_softmax(logits, dim=-1)  # [new_tokens, vocab]
        for step, entry in enumerate(output.outputs[0].logprobs or []):
            ids = [token for token, _ in entry.top_logprobs]
            ours = torch.tensor([logprob for _, logprob in entry.top_logprobs])
            torch.testing.assert_close(ours, expected[step, ids], atol=1e-4, rtol=1e-4)


def test_each_adapter_behaves_through_the_real_server(demo: DemoServer) -> None:
    """`loraserve demo` as a user runs it: its sample exchange, then held-out questions
    to every model at once; each adapter's property holds on most replies, not the base's."""
    models = [BASE_MODEL_NAME, *SERVED]
    requests = [(model, question) for model in models for question in QUESTIONS]
    with ThreadPoolExecutor(len(requests)) as pool:
        replies = list(pool.map(lambda request: _ask(demo.client, *request), requests))
    by_model = {
        model: replies[index * len(QUESTIONS) : (index + 1) * len(QUESTIONS)]
        for index, model in enumerate(models)
    }
    for name, recipe in SERVED.items():
        passed = [recipe.check(reply) for reply in by_model[name]]
        by_base = [recipe.check(reply) for reply in by_model[BASE_MODEL_NAME]]
        assert sum(passed) >= MIN_PASSED, (name, by_model[name])
        assert sum(by_base) <= len(QUESTIONS) - MIN_PASSED, (name, by_model[BASE_MODEL_NAME])


def _ask(client: openai.OpenAI, model: str, question: str) -> str:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    return reply.choices[0].message.content or ""
