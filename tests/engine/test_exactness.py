"""loraserve's greedy outputs equal PEFT's, for many adapters mixed in one batch.

For each model family, one `generate` call mixes adapters of different ranks
(odd, rsLoRA, rank_pattern/alpha_pattern, different target subsets) with base-model
requests; every request must produce the tokens PEFT produces for that adapter
alone, with logprobs equal to 1e-4. DoRA adapters (PEFT `use_dora=True`, unmerged) are
among them. Also under a pool so small that requests are
preempted and recomputed, and with prompts chunked by a tiny token budget.

Families with sliding windows have windows of 12 tokens, so every prompt and its 32
new tokens run past them; Phi-3's adapters target its fused qkv_proj / gate_up_proj.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from factories import greedy_reference, make_adapter, make_model, peft_model_for

from loraserve import LLM, SamplingParams
from loraserve.models.arch import FUSED_MODULES, LORA_MODULES

NEW_TOKENS = 32
ADAPTERS = {
    "attn8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "all7": dict(
        r=7,
        lora_alpha=14,
        target_modules=list(LORA_MODULES),
    ),
    "mlp16rs": dict(
        r=16, lora_alpha=8, use_rslora=True, target_modules=["gate_proj", "up_proj", "down_proj"]
    ),
    "pattern": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 12},
        alpha_pattern={"down_proj": 3},
    ),
    # DoRA (g = m / ||W + sBA|| per output feature), beside the plain ones in the same batch.
    "dora-attn": dict(
        r=6, lora_alpha=12, use_dora=True, target_modules=["q_proj", "v_proj", "o_proj"]
    ),
    "dora-all": dict(
        r=5,
        lora_alpha=7,
        use_dora=True,
        use_rslora=True,
        target_modules=list(LORA_MODULES),
        rank_pattern={"k_proj": 9},
        alpha_pattern={"up_proj": 4},
    ),
}
# (adapter, prompt text); None = base model. Adapters appear twice so segments repeat.
REQUESTS = [
    ("attn8", "hello world"),
    (None, "SELECT name FROM users"),
    ("all7", "Bonjour le monde"),
    ("mlp16rs", "The quick brown fox jumps over the lazy dog"),
    ("pattern", "LoRA adapters share"),
    ("all7", "this is a tiny corpus"),
    (None, "hello"),
    ("pattern", "0123456789 SELECT id FROM users WHERE id = 42; Bonjour"),
    ("dora-attn", "hello world"),
    ("dora-all", "The quick brown fox jumps over the lazy dog"),
    ("dora-all", "LoRA adapters share"),
]


# name -> (tests/helpers/factories.py kind, config overrides)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "llama-gqa": ("llama-gqa", {}),
    "qwen2": ("qwen2", {}),
    "mistral-window": ("mistral", dict(sliding_window=12)),
    "qwen2-window": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=12, max_window_layers=1),
    ),
    "qwen3": ("qwen3", {}),
    "gemma2": ("gemma2", {}),
    "gemma3": ("gemma3", {}),
    "phi3": ("phi3", {}),
    "phi4-mini": ("phi4-mini", {}),
}
# phi4-mini's longrope switches to its long factors when contexts may pass its original
# length (128); transformers uses the short ones below it: so do these runs.
LLM_OPTIONS: dict[str, dict] = {"phi4-mini": dict(max_model_len=128)}


def fused_names(config: dict) -> dict:
    """An adapter config for a fused-projection model (Phi-3): q/k/v -> qkv_proj, gate/up ->
    gate_up_proj, in targets and patterns alike."""
    fused = {LORA_MODULES[i]: name for name, group in FUSED_MODULES.items() for i in group}

    def rename(names):
        return sorted({fused.get(name, name) for name in names})

    config = dict(config, target_modules=rename(config["target_modules"]))
    for key in ("rank_pattern", "alpha_pattern"):
        if key in config:
            config[key] = {fused.get(name, name): value for name, value in config[key].items()}
    return config


def make_adapters(base, root: Path, fused: bool = False) -> dict[str, Path]:
    """Every one of ADAPTERS for `base`, in `root / name`; `fused`: on qkv_proj/gate_up_proj."""
    return {
        name: make_adapter(base, root / name, seed=10 + i, **(fused_names(c) if fused else c))
        for i, (name, c) in enumerate(ADAPTERS.items())
    }


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """A tiny model of one family, its adapters, and PEFT's answer for every request."""
    return prepare_family(request.param, tmp_path_factory)


def prepare_family(name: str, tmp_path_factory: pytest.TempPathFactory):
    """(root, LLM options, prompts, PEFT's (tokens, logits) by request) of family `name`."""
    kind, overrides = FAMILIES[name]
    root = tmp_path_factory.mktemp(name)
    base = make_model(root / "model", kind, seed=1, **overrides)
    folders = make_adapters(base, root, fused=kind.startswith("phi"))
    options = dict(adapters=folders, device="cpu", dtype="float32")
    options.update(LLM_OPTIONS.get(name, {}))
    llm = LLM(root / "model", **options)
    prompts = [llm.tokenizer.encode(text) for _, text in REQUESTS]
    references = {}
    peft_models = {name: peft_model_for(base, folder) for name, folder in folders.items()}
    for index, (adapter, _) in enumerate(REQUESTS):
        model = base if adapter is None else peft_models[adapter]
        references[index] = greedy_reference(model, prompts[index], NEW_TOKENS)
    return root, options, prompts, references


def check_against_peft(llm: LLM, prompts, references, num_logprobs: int = 20) -> None:
    params = SamplingParams(
        max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=num_logprobs
    )
    outputs = llm.generate(
        prompt_token_ids=prompts, sampling_params=params, adapter=[a for a, _ in REQUESTS]
    )
    for index, output in enumerate(outputs):
        tokens, logits = references[index]
        assert output.token_ids == tokens, (
            f"request {index} ({REQUESTS[index][0]}) differs from PEFT"
        )
        assert output.finish_reason == "length"
        reference_logprobs = torch.log_softmax(logits, dim=-1)  # [new_tokens, vocab]
        for step, entry in enumerate(output.outputs[0].logprobs or []):
            ids = [token for token, _ in entry.top_logprobs]
            ours = torch.tensor([logprob for _, logprob in entry.top_logprobs])
            torch.testing.assert_close(ours, reference_logprobs[step, ids], atol=1e-4, rtol=1e-4)
            assert entry.logprob == pytest.approx(
                reference_logprobs[step, entry.token_id].item(), abs=1e-4, rel=1e-4
            )


@pytest.mark.parametrize("kernel_backend", ["native", "torch"])
def test_mixed_batch_equals_peft(family, kernel_backend: str) -> None:
    """The CPU's two kernel paths: the native C kernels (`auto` on a CPU) and torch's."""
    root, options, prompts, references = family
    llm = LLM(root / "model", **options, kernel_backend=kernel_backend)
    assert llm.engine.info.kernel_backend == kernel_backend
    # A sliding window does not cap the context: the kernels implement it.
    assert llm.engine.info.max_model_len == options.get("max_model_len", 512)
    check_against_peft(llm, prompts, references)
    llm.engine.memory.check_invariants()
    assert llm.engine.memory.num_kv_pages == 0


def test_exact_under_preemption_and_chunked_prefill(family) -> None:
    check_under_preemption_and_chunked_prefill(family)


def check_under_preemption_and_chunked_prefill(family, **engine_options) -> None:
    """A pool of a few pages forces preemption (recompute); a budget of 8 tokens chunks prompts."""
    root, options, prompts, references = family
    llm = LLM(
        root / "model",
        **options,
        **engine_options,
        block_size=8,
        pool_pages=14,
        max_num_batched_tokens=8,
        max_num_seqs=8,
    )
    check_against_peft(llm, prompts, references, num_logprobs=5)
    assert llm.engine.num_preemptions > 0, "the pool was meant to be too small for all requests"
    llm.engine.memory.check_invariants()


def test_exact_with_the_disk_tier(family) -> None:
    """Adapters listed in a folder and read on first use by a loader thread, host RAM for
    one idle adapter, one pinned, and two pool slots: requests wait for their reads and
    for slots (adapters are evicted and read again), and still equal PEFT's tokens."""
    root, options, prompts, references = family
    folders = options["adapters"]
    family_options = {key: value for key, value in options.items() if key != "adapters"}
    llm = LLM(
        root / "model",
        **family_options,
        adapter_dir=root,  # the model folder beside the adapters has no adapter config
        pinned_adapters=["pattern"],
        max_cpu_loras=1,
        max_resident_adapters=2,
        adapter_load_workers=1,
    )
    assert sorted(llm.names.listed()) == sorted(folders)
    assert llm.engine.catalog.names() == ["pattern"]  # the others are read when named
    check_against_peft(llm, prompts, references, num_logprobs=5)
    memory, catalog = llm.engine.memory, llm.engine.catalog
    memory.check_invariants()
    assert sorted(catalog.names()) == sorted(folders)
    assert memory.pinned_adapters() == ["pattern"] and memory.num_kv_pages == 0
    assert len(catalog.host_adapters()) <= 1  # the budget holds once nothing is in use
    assert memory.stats.adapter_evictions > 0, "two slots were meant to be too few"


def test_triton_backend_equals_peft(family) -> None:
    """The Triton kernels in the engine (the interpreter on CPU): same greedy tokens as PEFT.

    The interpreter is slow, so two families (Llama with GQA; Gemma 2, whose local layers
    and capped scores take the kernel's window and soft-cap paths), 8 new tokens, mixed
    adapters and chunked prefill."""
    root, options, prompts, references = family
    if root.name.rstrip("0123456789") not in ("llama-gqa", "gemma2"):
        pytest.skip("two families are enough under the interpreter")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs the interpreter; test_gpu.py covers CUDA")
    llm = LLM(
        root / "model",
        **options,
        kernel_backend="triton",
        max_num_batched_tokens=16,
        max_num_seqs=8,
    )
    assert llm.engine.info.kernel_backend == "triton"
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(
        prompt_token_ids=prompts, sampling_params=params, adapter=[a for a, _ in REQUESTS]
    )
    for index, output in enumerate(outputs):
        assert output.token_ids == references[index][0][:8], f"request {index} differs from PEFT"


def test_longrope_long_factors_past_the_original_length(tmp_path) -> None:
    """phi4-mini with contexts allowed past its original length (128): loraserve rotates with
    the long factors throughout, as transformers does for a sequence already past it."""
    base = make_model(tmp_path / "model", "phi4-mini", seed=3)
    adapter = make_adapter(base, tmp_path / "qkv", seed=4, **fused_names(ADAPTERS["all7"]))
    llm = LLM(tmp_path / "model", adapters={"qkv": adapter}, device="cpu", dtype="float32")
    text = " ".join(2 * [text for _, text in REQUESTS])
    prompts = [llm.tokenizer.encode(text), llm.tokenizer.encode(text[7:])]
    assert min(map(len, prompts)) > 128
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, adapter=[None, "qkv"])
    models = [base, peft_model_for(base, adapter)]
    for output, prompt, model in zip(outputs, prompts, models, strict=True):
        assert output.token_ids == greedy_reference(model, prompt, 8)[0]
