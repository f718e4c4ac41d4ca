"""The embedded demo of `loraserve demo`: a tiny model and a few adapters, built offline.

Nothing is downloaded. The first call trains, on the CPU in a minute or two, a small
Llama-shaped model with a character-level tokenizer and a chat template, then four
LoRA adapters on top of it, and caches them under the user's cache dir:

    $XDG_CACHE_HOME/loraserve/demo-v2/        (default ~/.cache/loraserve/demo-v2)
        model/      config.json, model.safetensors, tokenizer.json, tokenizer_config.json
        adapters/   shout/ reverse/ rot13/ pirate/  (adapter_config.json + adapter_model.safetensors)

The base model repeats the user's message; each adapter answers it its own way:

    "hello world"  base: hello world    shout: HELLO WORLD    reverse: dlrow olleh
                   rot13: uryyb jbeyq   pirate: hello world, arr!

A prompt is either a chat (the template renders `<s><|user|>hello world</s><|assistant|>`)
or a plain completion of the text followed by a newline (`"hello world\\n"`). Short
ASCII messages work (trained up to 24 characters); a system prompt mostly does,
earlier turns of a conversation do not (not trained: the build has no time for them).

The files are the ones `transformers`' and `peft`'s `save_pretrained` write (same
names, keys and config fields; the tests load them with both and compare logits),
but they are written here with torch and safetensors alone: the server never imports
transformers or peft (DESIGN.md), so `loraserve demo` works with the runtime
dependencies only. The model below is therefore a minimal Llama written for training.

A build goes to a temporary folder renamed into place at the end, so an interrupted
build never leaves a half cache; bump `DEMO_VERSION` whenever the recipe changes so
existing caches are rebuilt rather than reused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from loraserve.models.hf_files import (
    generation_config,
    llama_config,
    lora_adapter_config,
    write_json,
)
from loraserve.server.demo_training import (
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

DEMO_VERSION = "demo-v2"
"""Name of the cache folder; change it with any change to what the build produces."""


def ensure_demo_assets(
    cache_dir: Path | None = None,
    progress: Callable[[str], None] = print,
    quick: bool = False,
) -> tuple[Path, dict[str, Path]]:
    """The demo's (model folder, {adapter name: adapter folder}), built on first use.

    `cache_dir` is loraserve's cache root (default `$XDG_CACHE_HOME/loraserve`).
    `quick` trains a tenth of the steps: complete, loadable files whose adapters do
    not yet behave as described (for tests); it is cached apart from the full build."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / (DEMO_VERSION + ("-quick" if quick else ""))
    if not _is_complete(folder):
        if folder.exists():
            progress(f"demo cache {folder} is incomplete; rebuilding it")
            shutil.rmtree(folder)
        _build_atomically(folder, progress, quick)
    return folder / "model", {name: folder / "adapters" / name for name in ADAPTER_TASKS}


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/loraserve`, or `~/.cache/loraserve` when it is unset."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loraserve"


def _expected_files(folder: Path) -> list[Path]:
    model = folder / "model"
    files = [model / name for name in ("config.json", "model.safetensors", "tokenizer.json")]
    files += [model / "generation_config.json", model / "tokenizer_config.json"]
    for name in ADAPTER_TASKS:
        adapter = folder / "adapters" / name
        files += [adapter / "adapter_config.json", adapter / "adapter_model.safetensors"]
    return files


def _is_complete(folder: Path) -> bool:
    return all(path.is_file() for path in _expected_files(folder))


def _build_atomically(folder: Path, progress: Callable[[str], None], quick: bool) -> None:
    """Build into a sibling temporary folder, then rename it to `folder` in one step."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(folder)
    prefix = f".{folder.name}.partial-{os.getpid()}-"
    partial = Path(tempfile.mkdtemp(prefix=prefix, dir=folder.parent))
    try:
        _build(partial, progress, quick)
        try:
            partial.rename(folder)
        except OSError:  # another process finished the same build first: keep its files
            if not _is_complete(folder):
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _remove_abandoned_builds(folder: Path) -> None:
    """Delete partial builds of `folder` whose process is gone (killed before cleaning up)."""
    for partial in folder.parent.glob(f".{folder.name}.partial-*"):
        pid = partial.name.removeprefix(f".{folder.name}.partial-").split("-")[0]
        if pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    return True


def _build(folder: Path, progress: Callable[[str], None], quick: bool) -> None:
    """Train and write the model and every adapter into `folder`.

    Seeded: byte-identical files on one machine. Not across machines, nor across
    thread counts (float sums in another order), hence the fixed thread count."""
    started = time.monotonic()
    progress(f"building the loraserve demo (once) into {folder.parent}: a minute or two on CPU")
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
