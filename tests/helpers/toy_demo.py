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
    TinyLlama,
    add_lora,
    build_tokenizer,
    lora_alpha,
    remove_lora,
    toy_arch,
    train,
)

from loraserve.demo.cache import ensure_built
from loraserve.models.hf_files import ADAPTER_FILES, MODEL_FILES, write_adapter, write_model

TOY_VERSION = "toy-v2"
"""Name of the cache folder; change it with any change to what the build produces."""


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
    scale = 10 if quick else 1
    with _training_threads(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TinyLlama(toy_arch(tokenizer))
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
    """hf_files.MODEL_FILES, the chat template in tokenizer_config.json."""
    write_model(folder, model.arch, model.state_dict(), tokenizer, {
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": EOS,
        "model_max_length": model.arch.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    })  # fmt: skip


def _write_adapter(folder: Path, wrapped: dict[str, LoraLinear], rank: int) -> None:
    """hf_files.ADAPTER_FILES, under the names PEFT's save_pretrained gives the weights."""
    weights = {}
    for name, lora in wrapped.items():
        prefix = f"base_model.model.{name}"
        weights[f"{prefix}.lora_A.weight"] = lora.lora_A.weight  # [r, in]
        weights[f"{prefix}.lora_B.weight"] = lora.lora_B.weight  # [out, r]
    write_adapter(folder, weights, rank, lora_alpha(rank), list(LORA_TARGET_MODULES))
