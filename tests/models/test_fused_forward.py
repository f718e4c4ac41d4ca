"""The forward pass with the fused Triton glue (kernels/add_rms_norm.py, rope_kv_write.py,
gated_activation.py; rope_kv_attention.py in decode steps) against the torch path's, in
the families whose pieces the exactness suite's Triton runs (Llama with GQA, Gemma 2) do
not reach: Qwen3's per-head q/k norms, Gemma 3's (1 + w) q/k and output norms with a local
RoPE base, Phi-4-mini's partial rotary and fused projections. float32 and float16, an adapter on every module,
mixed with base-model requests; greedy tokens must agree and logprobs be close.
"""

from __future__ import annotations

import os

import pytest
from factories import make_adapter, make_model

from loraserve import LLM, SamplingParams
from loraserve.models.arch import LORA_MODULES

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton on CPU tensors needs the interpreter; test_gpu.py covers CUDA",
)

FAMILIES = {  # family -> the adapter's target modules (Phi: its fused projections)
    "qwen3": list(LORA_MODULES),
    "gemma3": list(LORA_MODULES),
    "phi4-mini": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}
LOGPROB_TOLERANCE = {"float32": 1e-4, "float16": 3e-2}
PROMPTS = ["hello world", "SELECT name FROM users", "Bonjour le monde"]
NEW_TOKENS = 4


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    base = make_model(root / "model", request.param, seed=5)
    adapter = make_adapter(base, root / "all", seed=6, r=8, lora_alpha=16,
                           target_modules=FAMILIES[request.param])  # fmt: skip
    return root, adapter


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_triton_glue_equals_the_torch_path(family, dtype: str) -> None:
    root, adapter = family
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=3)
    outputs = {}
    for backend in ("torch", "triton"):
        llm = LLM(
            root / "model",
            adapters={"all": adapter},
            device="cpu",
            dtype=dtype,
            kernel_backend=backend,
            max_model_len=128,  # Phi-4-mini's short RoPE factors, as transformers uses them
        )
        prompts = [llm.tokenizer.encode(text) for text in PROMPTS]
        outputs[backend] = llm.generate(
            prompt_token_ids=prompts, sampling_params=params, adapter=["all", None, "all"]
        )
    tolerance = LOGPROB_TOLERANCE[dtype]
    for ours, theirs in zip(outputs["triton"], outputs["torch"], strict=True):
        assert ours.token_ids == theirs.token_ids
        for step, (mine, reference) in enumerate(
            zip(ours.outputs[0].logprobs or [], theirs.outputs[0].logprobs or [], strict=True)
        ):
            assert mine.logprob == pytest.approx(reference.logprob, abs=tolerance), step
        assert len(ours.outputs[0].logprobs or []) == NEW_TOKENS
