"""The demo's training recipe with DoRA (`loraserve.demo.train --dora`), on a tiny model:
the folder it writes is a PEFT DoRA folder (float16, as the demo's), loraserve serves it
beside the base model in one batch with PEFT's greedy tokens."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from factories import greedy_reference, make_model, peft_model_for
from safetensors.torch import load_file

from loraserve import LLM, SamplingParams
from loraserve.demo.lora_training import TrainingSettings, train_adapter


def test_a_dora_adapter_trained_by_the_recipe_is_served_as_peft_serves_it(tmp_path: Path) -> None:
    base = make_model(tmp_path / "model", "llama", seed=2)
    generator = torch.Generator().manual_seed(0)
    examples = [
        (torch.randint(3, 200, (6,), generator=generator).tolist(), [17, 18, 19, 20])
        for _ in range(8)
    ]
    settings = TrainingSettings(
        epochs=3, batch_size=4, learning_rate=5e-2, warmup_steps=1, use_dora=True
    )
    train_adapter(tmp_path / "model", examples, tmp_path / "dora", settings, log=lambda _: None)
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "dora" / "adapter_model.safetensors")
    magnitudes = [name for name in tensors if name.endswith("lora_magnitude_vector")]
    assert config["use_dora"] is True and len(magnitudes) == 2 * 2  # q and v of 2 layers
    llm = LLM(
        tmp_path / "model", adapters={"dora": tmp_path / "dora"}, device="cpu", dtype="float32"
    )
    prompts = [examples[0][0], examples[0][0]]  # the adapter, then the base model
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, adapter=["dora", None])
    models = [peft_model_for(base, tmp_path / "dora"), base]
    for output, prompt, model in zip(outputs, prompts, models, strict=True):
        assert output.token_ids == greedy_reference(model, prompt, 8)[0]
    assert outputs[0].token_ids != outputs[1].token_ids, "training was meant to change it"
