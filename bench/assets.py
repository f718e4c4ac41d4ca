"""The benchmarks' model and adapter folders, built once into a cache and reused.

    $XDG_CACHE_HOME/loraserve/bench/<shape>-<dtype>-v<N>/   (default ~/.cache/loraserve/bench/...)
        model/                  a bench/models.py shape, random weights
        adapters/r<rank>/<name> PEFT LoRA adapters of that shape (`<name>-dora`: DoRA ones)

Every bench command that needs a model takes `--cache-dir` (default `default_cache_dir()`)
and asks `ensure_assets` for what it needs: the first run builds, later runs reuse.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .models import SHAPES, build_adapter, build_model
from .trace import adapter_name

ASSETS_VERSION = 2
"""In the cache folder's name: raised whenever bench/models.py writes other files (2: the
byte-level tokenizer that structured output can read)."""


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "loraserve" / "bench"


def ensure_assets(
    model_name: str,
    ranks: tuple[int, ...],
    num_adapters: int,
    cache_dir: Path,
    dtype: str,
    dora_fraction: float = 0.0,
) -> tuple[Path, dict[str, Path]]:
    """(model folder, {adapter name: folder}) of a bench/models.py shape, built on first use.

    Adapter i has rank `ranks[i % len(ranks)]` and seed i, so the first n adapters
    of a bigger set are the n adapters of a smaller one. `dora_fraction` of them, spread
    evenly (`is_dora`), are DoRA adapters with the same A and B."""
    arch = SHAPES[model_name]
    root = cache_dir / f"{model_name}-{dtype}-v{ASSETS_VERSION}"
    model = root / "model"
    torch_dtype = getattr(torch, dtype)
    if not (model / "config.json").is_file():
        print(f"building the {model_name} model into {model}", flush=True)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        build_model(model, arch, torch_dtype, device)
    adapters = {}
    for index in range(num_adapters):
        rank = ranks[index % len(ranks)]
        name = adapter_name(index)
        dora = is_dora(index, dora_fraction)
        folder = root / "adapters" / f"r{rank}" / (f"{name}-dora" if dora else name)
        if not (folder / "adapter_config.json").is_file():
            build_adapter(folder, arch, rank, seed=index, dtype=torch_dtype, dora=dora)
        adapters[name] = folder
    return model, adapters


def is_dora(index: int, fraction: float) -> bool:
    """Whether adapter `index` is one of the `fraction` made DoRA (0.25: indices 3, 7, 11, ...)."""
    return int((index + 1) * fraction) > int(index * fraction)
