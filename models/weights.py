"""Read a local Hugging Face checkpoint (safetensors only) into a dict of tensors.

Names stay the Hugging Face ones (`model.layers.3.self_attn.q_proj.weight`); the
forward pass fuses what it fuses. Every expected tensor is checked by name and
shape against the ModelArch before any is read, so a config that does not match
its weights fails at start-up with the tensor named, not with a matmul error.
Pickled `pytorch_model*.bin` checkpoints are refused rather than unpickled: a
pickle can run arbitrary code.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from loraserve.errors import ModelLoadError
from loraserve.models.arch import ModelArch, linear_parent
from loraserve.models.hf_config import model_folder, read_json
from loraserve.models.tensor_parallel import Shard, shard_tensor

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
NUM_NAMES_SHOWN = 5  # how many missing / unexpected names an error lists


def expected_weight_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, HF name -> shape (lm_head included, even when tied)."""
    hidden = arch.hidden_size
    shapes: dict[str, tuple[int, ...]] = {EMBEDDING: (arch.vocab_size, hidden)}
    for layer in range(arch.num_layers):
        shapes.update(layer_weight_shapes(arch, f"model.layers.{layer}."))
    shapes["model.norm.weight"] = (hidden,)
    shapes[LM_HEAD] = (arch.vocab_size, hidden)
    return shapes


def layer_weight_shapes(arch: ModelArch, prefix: str) -> dict[str, tuple[int, ...]]:
    """One decoder layer's tensors: its family's norms, linears (fused or not) and biases."""
    shapes: dict[str, tuple[int, ...]] = {}
    for norm in arch.layer_norms:
        shapes[f"{prefix}{norm}.weight"] = (arch.hidden_size,)
    if arch.qk_norm:
        shapes[f"{prefix}self_attn.q_norm.weight"] = (arch.head_dim,)
        shapes[f"{prefix}self_attn.k_norm.weight"] = (arch.head_dim,)
    for module in arch.linear_modules:
        in_features, out_features = arch.module_dims(module)
        name = f"{prefix}{linear_parent(module)}.{module}."
        shapes[name + "weight"] = (out_features, in_features)
        if arch.has_bias(module):
            shapes[name + "bias"] = (out_features,)
    return shapes


def load_weights(
    folder: str | Path,
    arch: ModelArch,
    dtype: torch.dtype,
    device: torch.device | str,
    shard: Shard | None = None,
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors by HF name, converted to `dtype` on `device`; with `shard`,
    only a tensor-parallel rank's part of each (models/tensor_parallel.py), read as such.

    With tied embeddings and no `lm_head.weight` in the checkpoint, lm_head is the
    embedding tensor itself. A tied checkpoint that does hold an lm_head keeps it
    when it differs from the embedding, as transformers 5 does (it then unties)."""
    path = model_folder(folder)
    files = checkpoint_files(path)
    expected = expected_weight_shapes(arch)
    tied = arch.tie_word_embeddings and LM_HEAD not in files
    if tied:
        del expected[LM_HEAD]
    _check_names(files, expected, path)
    _check_shapes(files, expected)
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in expected:
        by_file[files[name]].append(name)
    weights: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        weights.update(_read_file(file, names, dtype, device, arch, shard))
    if tied or (arch.tie_word_embeddings and torch.equal(weights[LM_HEAD], weights[EMBEDDING])):
        weights[LM_HEAD] = weights[EMBEDDING]  # one tensor: no second vocab x hidden copy
    return weights


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single file or sharded index)."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index_path} has no `weight_map` object")
        files = {name: folder / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise ModelLoadError(f"{index_path} names shard {shard.name}, which is missing")
        return files
    single = folder / SINGLE_FILE
    if single.is_file():
        with _open(single) as handle:
            return dict.fromkeys(handle.keys(), single)
    if any(folder.glob("pytorch_model*.bin")):
        raise ModelLoadError(
            f"{folder} holds only pytorch_model*.bin (pickle) weights, which loraserve does not "
            "load: convert them to safetensors first (e.g. load with transformers and "
            "`save_pretrained(DIR, safe_serialization=True)`)"
        )
    raise ModelLoadError(f"{folder} has no weights: expected {SINGLE_FILE} or {INDEX_FILE}")


def _check_names(
    files: dict[str, Path], expected: dict[str, tuple[int, ...]], folder: Path
) -> None:
    """Every expected name present and nothing unexpected; else ModelLoadError."""
    missing = [name for name in expected if name not in files]
    if missing:
        hint = " (tie_word_embeddings is false)" if LM_HEAD in missing else ""
        raise ModelLoadError(
            f"{folder}: {len(missing)} weights missing{hint}, e.g. {', '.join(missing[:NUM_NAMES_SHOWN])}"
        )
    # Extra tensors mean config.json describes another model than the weights
    # (e.g. biases the config does not declare): refuse instead of ignoring them.
    unexpected = [
        name for name in files if name not in expected and not name.endswith("rotary_emb.inv_freq")
    ]
    if unexpected:
        raise ModelLoadError(
            f"{folder}: {len(unexpected)} weights that config.json does not describe, e.g. "
            f"{', '.join(unexpected[:NUM_NAMES_SHOWN])}"
        )


def _check_shapes(files: dict[str, Path], expected: dict[str, tuple[int, ...]]) -> None:
    """Every expected tensor has the shape config.json implies; read from headers only."""
    for file in sorted(set(files[name] for name in expected)):
        with _open(file) as handle:
            stored = handle.keys()
            for name in (name for name in stored if name in expected):
                found = tuple(handle.get_slice(name).get_shape())
                if found != expected[name]:
                    raise ModelLoadError(
                        f"{file}: {name} has shape {list(found)}, expected {list(expected[name])} "
                        "from config.json"
                    )


def _read_file(
    file: Path,
    names: list[str],
    dtype: torch.dtype,
    device: torch.device | str,
    arch: ModelArch,
    shard: Shard | None,
) -> dict[str, torch.Tensor]:
    """The named tensors of one safetensors file (a rank's part of each, with `shard`), as
    `dtype` on `device`."""
    tensors: dict[str, torch.Tensor] = {}
    with _open(file) as handle:
        available = set(handle.keys())
        for name in names:
            if name not in available:  # an index that points to the wrong shard
                raise ModelLoadError(f"{file} does not hold {name}, though the index says it does")
            if shard is None:
                tensor = handle.get_tensor(name)
            else:
                tensor = shard_tensor(name, handle.get_slice(name), arch, shard)
            tensors[name] = tensor.to(device=device, dtype=dtype)
    return tensors


def _open(file: Path) -> Any:
    """safe_open, with a damaged or truncated file as a ModelLoadError that names it."""
    try:
        return safe_open(str(file), framework="pt")
    except SafetensorError as error:
        raise ModelLoadError(
            f"{file} is not a readable safetensors file (truncated or damaged?): {error}"
        ) from None
