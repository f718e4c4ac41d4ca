"""The toy's files (written by models/hf_files.py): complete, and read alike by
transformers/PEFT, by loraserve and by the model that trained them; its build through
the demo's cache: reused, reproducible.

A quick build (a tenth of the training) makes the files in a few seconds.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import toy_demo
from safetensors.torch import load_file
from toy_demo import TOY_VERSION, ensure_toy_demo
from toy_model import (
    ADAPTER_TASKS,
    COMPLETION_SUFFIX,
    ModelShape,
    TinyLlama,
    add_lora,
    render_chat,
)

from loraserve.models.config import load_arch
from loraserve.models.tokenizer import Tokenizer as LoraserveTokenizer

Assets = tuple[Path, dict[str, Path]]
CHAT = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    """A quick build in a fresh cache dir, shared by the tests of this module."""
    return ensure_toy_demo(tmp_path_factory.mktemp("cache"), progress=lambda _: None)


def test_layout_and_cache_folder(quick_demo: Assets) -> None:
    model_dir, adapters = quick_demo
    assert model_dir.parent.name == f"{TOY_VERSION}-quick"
    assert model_dir.name == "model"
    assert set(adapters) == set(ADAPTER_TASKS) and len(adapters) >= 3
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (model_dir / name).is_file(), name
    for name, folder in adapters.items():
        assert folder == model_dir.parent / "adapters" / name
        assert {p.name for p in folder.iterdir()} == {
            "adapter_config.json",
            "adapter_model.safetensors",
        }
    leftovers = [p.name for p in model_dir.parent.parent.iterdir() if "partial" in p.name]
    assert leftovers == []


def test_adapters_have_their_ranks_and_every_target_module(quick_demo: Assets) -> None:
    model_dir, adapters = quick_demo
    num_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    ranks = set()
    for name, folder in adapters.items():
        config = json.loads((folder / "adapter_config.json").read_text())
        rank = ADAPTER_TASKS[name].rank
        assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", rank, 2 * rank)
        weights = load_file(folder / "adapter_model.safetensors")
        assert len(weights) == 2 * num_layers * len(config["target_modules"])
        for key, tensor in weights.items():
            assert key.startswith("base_model.model.model.layers.")
            assert tensor.dtype == torch.float32
            assert (tensor.shape[0] if "lora_A" in key else tensor.shape[1]) == rank
        ranks.add(rank)
    assert len(ranks) > 1  # heterogeneous ranks, as the server must batch


def test_transformers_logits_equal_the_training_model(quick_demo: Assets) -> None:
    """What was trained is what transformers runs: same names, rope, norms, MLP."""
    from transformers import AutoModelForCausalLM

    model_dir, _ = quick_demo
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert reference.dtype == torch.float32
    trained = _training_model(model_dir)
    input_ids = torch.tensor([_chat_ids(model_dir, "hello world")])
    with torch.no_grad():
        torch.testing.assert_close(
            trained(input_ids), reference(input_ids).logits, rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("name", sorted(ADAPTER_TASKS))
def test_peft_logits_equal_the_training_model(quick_demo: Assets, name: str) -> None:
    """PEFT reads every adapter as trained (keys, alpha/r scaling), and it changes the logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, adapters = quick_demo
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    reference = PeftModel.from_pretrained(copy.deepcopy(base), str(adapters[name])).eval()
    trained = _training_model(model_dir)
    wrapped = add_lora(trained, ADAPTER_TASKS[name].rank)
    lora_weights = load_file(adapters[name] / "adapter_model.safetensors")
    for module_name, lora in wrapped.items():
        prefix = f"base_model.model.{module_name}"
        lora.lora_A.weight.data = lora_weights[f"{prefix}.lora_A.weight"]
        lora.lora_B.weight.data = lora_weights[f"{prefix}.lora_B.weight"]
    input_ids = torch.tensor([_chat_ids(model_dir, "hello world")])
    with torch.no_grad():
        expected = reference(input_ids).logits
        torch.testing.assert_close(trained(input_ids), expected, rtol=1e-4, atol=1e-4)
        assert (expected - base(input_ids).logits).abs().max() > 1e-3


def test_tokenizer_and_chat_template_agree_with_transformers(quick_demo: Assets) -> None:
    from transformers import AutoTokenizer

    model_dir, _ = quick_demo
    reference = AutoTokenizer.from_pretrained(model_dir)
    ours = LoraserveTokenizer.from_folder(model_dir)
    text = reference.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text == "<s><|user|>hello world</s><|assistant|>" == render_chat(CHAT)
    assert ours.apply_chat_template(CHAT, add_generation_prompt=True) == text
    assert ours.encode(text, add_special_tokens=False) == _chat_ids(model_dir, "hello world")
    completion = "Hello, World!" + COMPLETION_SUFFIX
    assert ours.encode(completion) == reference(completion).input_ids
    assert ours.encode(completion)[0] == ours.bos_token_id  # plain prompts get BOS too
    assert ours.decode(ours.encode(completion)) == completion
    assert ours.eos_token_ids == (reference.eos_token_id,)
    assert ours.vocab_size == len(reference) < 200


def test_loraserve_reads_the_model_config(quick_demo: Assets) -> None:
    model_dir, _ = quick_demo
    arch = load_arch(model_dir)
    tokenizer = LoraserveTokenizer.from_folder(model_dir)
    assert arch.architecture == "LlamaForCausalLM"
    assert arch.vocab_size == tokenizer.vocab_size
    assert arch.eos_token_ids == tokenizer.eos_token_ids
    assert arch.bos_token_id == tokenizer.bos_token_id
    assert arch.torch_dtype == "float32" and arch.rope_scaling is None


def test_second_call_reuses_the_cache(quick_demo: Assets, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir, adapters = quick_demo
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(toy_demo, "_build", _fail_if_called)
    messages: list[str] = []
    again = ensure_toy_demo(model_dir.parent.parent, progress=messages.append)
    assert again == (model_dir, adapters)
    assert messages == []
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_a_second_build_is_identical_and_leaves_torch_state_alone(
    quick_demo: Assets, tmp_path: Path
) -> None:
    model_dir, adapters = quick_demo
    torch.manual_seed(1234)
    expected_random = torch.rand(3)
    threads = torch.get_num_threads()
    torch.manual_seed(1234)
    other_model, other_adapters = ensure_toy_demo(tmp_path, progress=lambda _: None)
    assert torch.equal(torch.rand(3), expected_random)  # the build forks the RNG
    assert torch.get_num_threads() == threads
    pairs = [(model_dir, other_model)] + [(adapters[n], other_adapters[n]) for n in adapters]
    for first, second in pairs:
        for path in first.iterdir():
            assert path.read_bytes() == (second / path.name).read_bytes(), path


def _training_model(model_dir: Path) -> TinyLlama:
    """The build's own model class with the saved weights."""
    config = json.loads((model_dir / "config.json").read_text())
    model = TinyLlama(ModelShape(vocab_size=config["vocab_size"]))
    model.load_state_dict(load_file(model_dir / "model.safetensors"))
    return model.eval()


def _chat_ids(model_dir: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": text}]
    return list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    )


def _fail_if_called(*args: object) -> None:
    raise AssertionError("the toy was rebuilt although the cache is complete")
