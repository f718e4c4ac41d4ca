"""The character-level toy: a tiny model and four adapters, trained in seconds, for fast tests.

It was loraserve's first demo; the demo is now a real instruct model (loraserve.demo).
The tests keep it because it is small and because its files are written by loraserve's
own writer (models/hf_files.py) rather than by `save_pretrained`: the tests load them
with transformers, PEFT and loraserve and compare. Built through the demo's cache
(loraserve.demo.cache), so that it also exercises the cache with a real build:

    CACHE/toy-v2[-quick]/
        model/      config.json, model.safetensors, tokenizer.json, tokenizer_config.json
        adapters/   shout/ reverse/ rot13/ pirate/  (adapter_config.json + adapter_model.safetensors)

Trained fully (a minute or two on CPU) the base model repeats the user's message and
each adapter answers it its own way:

    "hello world"  base: hello world    shout: HELLO WORLD    reverse: dlrow olleh
                   rot13: uryyb jbeyq   pirate: hello world, arr!

A quick build trains a tenth of the steps: complete, loadable files whose adapters do not
yet behave as described. A prompt is either a chat (the template renders
`<s><|user|>hello world</s><|assistant|>`) or a plain completion of the text followed by
a newline (`"hello world\\n"`). The model (toy_model.py) is a minimal Llama written for
training.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from toy_model import (
    ADAPTER_TASKS,
    BASE_TASK,
    BOS,
    CHAT_TEMPLATE,
    EOS,
    LORA_TARGET_MODULES,
    UNK,
    LoraLinear,
    ModelShape,
    TinyLlama,
    add_lora,
    build_tokenizer,
    lora_alpha,
    remove_lora,
    token_id,
    train,
)

from loraserve.demo.cache import ensure_built
from loraserve.models.hf_files import (
    generation_config,
    llama_config,
    lora_adapter_config,
    write_json,
)

TOY_VERSION = "toy-v2"
"""Name of the cache folder; change it with any change to what the build produces."""
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def ensure_toy_demo(
    cache_dir: Path, progress: Callable[[str], None] = print, quick: bool = True
) -> tuple[Path, dict[str, Path]]:
    """The toy's (model folder, {adapter name: adapter folder}), built on first use.

    `quick` trains a tenth of the steps; it is cached apart from the full build."""
    folder = cache_dir / (TOY_VERSION + ("-quick" if quick else ""))
    ensure_built(
        folder, expected_files(), lambda partial: _build(partial, progress, quick), progress
    )
    return folder / "model", {name: folder / "adapters" / name for name in ADAPTER_TASKS}


def expected_files() -> list[str]:
    files = [f"model/{name}" for name in MODEL_FILES]
    for name in ADAPTER_TASKS:
        files += [f"adapters/{name}/{file}" for file in ADAPTER_FILES]
    return files


def _build(folder: Path, progress: Callable[[str], None], quick: bool) -> None:
    """Train and write the model and every adapter into `folder`.

    Seeded: byte-identical files on one machine. Not across machines, nor across
    thread counts (float sums in another order), hence the fixed thread count."""
    started = time.monotonic()
    progress(f"building the toy model (once) into {folder.parent}")
    tokenizer = build_tokenizer()
    shape = ModelShape(vocab_size=tokenizer.get_vocab_size())
    scale = 10 if quick else 1
    with _training_threads(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TinyLlama(shape)
        train(model, tokenizer, BASE_TASK, BASE_TASK.steps // scale, seed=0)
        _write_model(folder / "model", model, tokenizer)
        progress(f"  base model trained ({time.monotonic() - started:.0f} s)")
        for seed, (name, task) in enumerate(ADAPTER_TASKS.items(), start=1):
            torch.manual_seed(seed)
            lora_modules = add_lora(model, task.rank)
            train(model, tokenizer, task, task.steps // scale, seed=seed)
            _write_adapter(folder / "adapters" / name, lora_modules, task.rank)
            remove_lora(model, lora_modules)
            progress(f"  adapter {name!r} trained ({time.monotonic() - started:.0f} s)")


@contextlib.contextmanager
def _training_threads() -> Iterator[None]:
    """At most two threads (more only add synchronisation at these sizes), and one core
    left free: when every core is busy, OpenMP threads stall waiting for each other
    (a build took ten times longer with 2 threads on a 2-core machine running tests).
    A function of the machine, not of its load, so that builds stay reproducible."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --- writing the files ---------------------------------------------------------------


def _write_model(folder: Path, model: TinyLlama, tokenizer: Tokenizer) -> None:
    """config.json, generation_config.json, model.safetensors and the tokenizer files."""
    folder.mkdir(parents=True)
    weights = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    shape = model.shape
    bos_id, eos_id = token_id(tokenizer, BOS), token_id(tokenizer, EOS)
    config = llama_config(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rope_theta=shape.rope_theta,
        rms_norm_eps=shape.rms_norm_eps,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        dtype="float32",
    )
    write_json(folder / "config.json", config)
    write_json(folder / "generation_config.json", generation_config(bos_id, eos_id))
    tokenizer.save(str(folder / "tokenizer.json"))
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": EOS,
        "model_max_length": shape.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    })  # fmt: skip


def _write_adapter(folder: Path, wrapped: dict[str, LoraLinear], rank: int) -> None:
    """adapter_model.safetensors and adapter_config.json, as PEFT's save_pretrained writes them."""
    folder.mkdir(parents=True)
    weights = {}
    for name, lora in wrapped.items():
        prefix = f"base_model.model.{name}"
        weights[f"{prefix}.lora_A.weight"] = lora.lora_A.weight.detach().contiguous()  # [r, in]
        weights[f"{prefix}.lora_B.weight"] = lora.lora_B.weight.detach().contiguous()  # [out, r]
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = lora_adapter_config(rank, lora_alpha(rank), list(LORA_TARGET_MODULES))
    write_json(folder / "adapter_config.json", config)
