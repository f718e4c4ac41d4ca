"""Reading and validating a PEFT LoRA adapter folder, exactly as PEFT writes it.

A folder holds `adapter_config.json` and `adapter_model.safetensors`, with tensors
named like `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`
(`lora_A` is `[r, in_features]`, `lora_B` is `[out_features, r]`).

Which modules a config targets, and with which rank and alpha, follows PEFT 0.21
(`tuners_utils.check_target_module_exists`, `utils.other.get_pattern_key`) applied
to the module names PEFT matches against: those of the Hugging Face model,
`model.layers.{i}.self_attn.q_proj`, `model.layers.{i}.mlp.down_proj`, ... of the
base model's family (Phi-3: `self_attn.qkv_proj`, `mlp.gate_up_proj`, whose adapters
have one A and one B over the fused output).
Everything is checked before anything is returned, so a refused folder leaves no trace.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraserve.memory.adapter_dir import CONFIG_FILE
from loraserve.memory.peft_config import (
    SAFETENSORS_FILE,
    check_features,
    read_config,
    refuse,
)
from loraserve.memory.safetensors_map import (
    SafetensorsFile,
    SafetensorsFormatError,
    map_tensors,
)
from loraserve.models.arch import (
    FUSED_MODULES,
    MODULE_INDEX,
    ModelArch,
    linear_parent,
)

# `lora_A.default.weight`: some tools keep PEFT's in-memory adapter name.
TENSOR_NAME = re.compile(
    r"(?:base_model\.model\.)?model\.layers\.(?P<layer>\d+)\.(?P<parent>self_attn|mlp)"
    r"\.(?P<module>\w+)\.(?:lora_(?P<which>[AB])(?:\.default)?\.weight"
    r"|lora_magnitude_vector(?:\.default)?(?:\.weight)?)"
)
"""A/B of a module, or its DoRA magnitude (`...q_proj.lora_magnitude_vector`, as PEFT saves it)."""
MAGNITUDE = "M"
"""`pair_tensors`' key of a module's DoRA magnitude vector (beside "A" and "B")."""
ALL_LINEAR = "all-linear"
"""PEFT's shorthand for every linear layer but the output head."""


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer of one decoder layer, as the file holds it: views of the
    mapped file in its dtype (a float), shapes checked; values are checked once converted
    (memory/adapter_store.py)."""

    layer: int
    name: str
    """The linear layer as the model names it (`q_proj`, ..., or fused `qkv_proj`)."""
    rank: int
    scaling: float
    """lora_alpha / rank, or lora_alpha / sqrt(rank) with rsLoRA (per module)."""
    lora_a: torch.Tensor
    """[rank, in_features]"""
    lora_b: torch.Tensor
    """[out_features, rank]; a fused module's rows are its parts' outputs, in order"""
    a_name: str
    b_name: str
    magnitude: torch.Tensor | None = None
    """[out_features] DoRA's learned magnitude m (`use_dora`), None for plain LoRA"""
    magnitude_name: str = ""

    @property
    def slots(self) -> tuple[int, ...]:
        """The LORA_MODULES it fills: itself, or a fused module's parts (q, k, v)."""
        return FUSED_MODULES.get(self.name) or (MODULE_INDEX[self.name],)


@dataclass(frozen=True)
class _Target:
    key: str
    rank: int
    scaling: float


LAYOUT_FIELDS = (
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "r",
    "lora_alpha",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "use_dora",
)
"""The config fields that decide which tensors a folder must hold and how they are read
(`check_peft_lora` sees only these): folders whose headers and these fields are equal read
alike, so a reader may reuse what it worked out for one (memory/adapter_store.py)."""


def read_peft_lora(folder: Path, arch: ModelArch, max_lora_rank: int) -> list[LoraModule]:
    """Every adapted module of a PEFT LoRA folder, sorted by (layer, module in
    `arch.linear_modules` order); AdapterError if refused."""
    config = read_config(folder)
    check_features(config, folder)
    return check_peft_lora(
        folder, layout_config(config), lambda: load_tensors(folder), arch, max_lora_rank
    )


def layout_config(config: dict[str, Any]) -> dict[str, Any]:
    """The LAYOUT_FIELDS of `config` that it sets."""
    return {field: config[field] for field in LAYOUT_FIELDS if field in config}


def check_peft_lora(
    folder: Path,
    config: dict[str, Any],
    load: Callable[[], dict[str, torch.Tensor]],
    arch: ModelArch,
    max_lora_rank: int,
) -> list[LoraModule]:
    """`read_peft_lora` once the config is read and its features checked: `config` its
    `layout_config`, `load` the tensors (`load_tensors`), called once the targets resolve."""
    use_dora = bool(config.get("use_dora"))
    targets = resolve_targets(config, arch, max_lora_rank, folder)
    tensors = load()
    pairs = pair_tensors(tensors, arch, folder)
    strays = sorted(pairs.keys() - targets.keys())
    if strays:
        name = min(pairs[strays[0]].values())
        raise refuse(folder, f"tensor {name} is for a module that {CONFIG_FILE} does not target")
    missing = sorted(targets.keys() - pairs.keys())
    if missing:
        key = targets[missing[0]].key
        raise refuse(folder, f"{CONFIG_FILE} targets {key} but the weights have no tensors for it")
    return [
        _checked_module(folder, arch, where, targets[where], pairs[where], tensors, use_dora)
        for where in sorted(targets)
    ]


def base_module_names(arch: ModelArch) -> Iterator[str]:
    """The names of `named_modules()` of the family's HF model, which PEFT matches targets to."""
    activation = "activation_fn" if arch.fused_projections else "act_fn"  # Phi3MLP's name
    yield from ("model", "model.embed_tokens", "model.layers")
    for layer in range(arch.num_layers):
        prefix = f"model.layers.{layer}"
        yield from (prefix, f"{prefix}.self_attn", f"{prefix}.mlp", f"{prefix}.mlp.{activation}")
        yield from (f"{prefix}.{linear_parent(name)}.{name}" for name in arch.linear_modules)
        if arch.qk_norm:
            yield from (f"{prefix}.self_attn.q_norm", f"{prefix}.self_attn.k_norm")
        yield from (f"{prefix}.{norm}" for norm in arch.layer_norms)
    yield from ("model.norm", "model.rotary_emb", "lm_head")


def resolve_targets(
    config: dict[str, Any], arch: ModelArch, max_lora_rank: int, folder: Path
) -> dict[tuple[int, int], _Target]:
    """(layer, module index) -> rank and scaling of every module the config targets."""
    rank, alpha = _number(config, "r", folder), _number(config, "lora_alpha", folder)
    rank_pattern = _pattern(config, "rank_pattern", folder)
    alpha_pattern = _pattern(config, "alpha_pattern", folder)
    try:
        keys = [key for key in base_module_names(arch) if _is_targeted(config, key, arch, folder)]
    except re.error as error:
        raise refuse(folder, f"a target or layer pattern is not a valid regex ({error})") from None
    if not keys:
        raise refuse(folder, f"target_modules {config.get('target_modules')!r} matches no module")
    targets = {}
    for key in keys:
        where = _lora_module(key, arch, folder)
        module_rank = rank_pattern.get(get_pattern_key(rank_pattern, key), rank)
        module_alpha = alpha_pattern.get(get_pattern_key(alpha_pattern, key), alpha)
        if not isinstance(module_rank, int) or module_rank < 1:
            raise refuse(folder, f"rank of {key} is {module_rank!r}; expected a positive integer")
        if module_rank > max_lora_rank:
            raise refuse(
                folder, f"rank {module_rank} of {key} is above max_lora_rank {max_lora_rank}"
            )
        root = math.sqrt(module_rank) if config.get("use_rslora") else module_rank
        targets[where] = _Target(key, module_rank, module_alpha / root)
    return targets


def get_pattern_key(pattern_keys: Iterable[str], key_to_match: str) -> str:
    """PEFT's `get_pattern_key`: the first pattern that matches a dot-bounded suffix of the key."""
    for pattern in pattern_keys:
        if re.match(rf"(.*\.)?({pattern})$", key_to_match):
            return pattern
    return key_to_match


def _is_targeted(config: dict[str, Any], key: str, arch: ModelArch, folder: Path) -> bool:
    """PEFT's `check_target_module_exists` (exclude_modules, layers_to_transform included)."""
    target_modules = config.get("target_modules")
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        target_modules = list(arch.linear_modules)
    if _is_excluded(config.get("exclude_modules"), key):
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    if not isinstance(target_modules, list):
        raise refuse(folder, f"target_modules is {target_modules!r}; expected a list or a regex")
    if key in target_modules:
        return True
    found = any(key.endswith(f".{target}") for target in target_modules)
    layers = config.get("layers_to_transform")
    if not found or layers is None or layers == []:
        return found
    layer = _layer_index(key, config.get("layers_pattern"))
    if layer is None:
        return False
    return layer == layers if isinstance(layers, int) else layer in layers


def _is_excluded(exclude: Any, key: str) -> bool:
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, key) is not None
    return key in exclude or any(key.endswith(f".{name}") for name in exclude)


def _layer_index(key: str, layers_pattern: Any) -> int | None:
    """The layer number in a module key, found as PEFT finds it (the first numbered segment)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _lora_module(key: str, arch: ModelArch, folder: Path) -> tuple[int, int]:
    """(layer, index in arch.linear_modules) of a targeted module key; refuses anything else."""
    if key == "model.embed_tokens":
        raise refuse(
            folder, "targets the embedding (embed_tokens); embedding LoRA is not supported"
        )
    if key == "lm_head":
        raise refuse(folder, "targets lm_head; LoRA on the output head is not supported")
    match = re.fullmatch(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)", key)
    if match is None or match.group(3) not in arch.linear_modules:
        raise refuse(
            folder,
            f"target_modules matches {key}, which is not one of the layers loraserve "
            f"adapts ({', '.join(arch.linear_modules)})",
        )
    return int(match.group(1)), arch.linear_modules.index(match.group(3))


def _number(config: dict[str, Any], field: str, folder: Path) -> int | float:
    value = config.get(field)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise refuse(folder, f"{field} is {value!r}; expected a number")
    return value


def _pattern(config: dict[str, Any], field: str, folder: Path) -> dict[str, Any]:
    pattern = config.get(field) or {}
    if not isinstance(pattern, dict):
        raise refuse(folder, f"{field} is {pattern!r}; expected an object")
    for key in pattern:
        try:
            re.compile(key)
        except re.error as error:
            raise refuse(folder, f"{field} key {key!r} is not a valid regex ({error})") from None
    return pattern


def load_tensors(folder: Path, file: SafetensorsFile | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of adapter_model.safetensors (`file`, that file already opened): views of
    the mapped file (CPU), nothing copied."""
    try:
        if file is not None:
            return file.tensors()
        return map_tensors(folder / SAFETENSORS_FILE)
    except (SafetensorsFormatError, OSError) as error:
        raise refuse(folder, f"cannot read {SAFETENSORS_FILE} ({error})") from None


def pair_tensors(
    tensors: dict[str, torch.Tensor], arch: ModelArch, folder: Path
) -> dict[tuple[int, int], dict[str, str]]:
    """(layer, module index) -> {"A": name, "B": name[, MAGNITUDE: name]}; refuses strays and
    orphans."""
    pairs: dict[tuple[int, int], dict[str, str]] = {}
    for name in sorted(tensors):  # sorted: the same message for the same folder
        layer, module, which = _parse_tensor_name(name, arch, folder)
        pair = pairs.setdefault((layer, module), {})
        if which in pair:
            raise refuse(folder, f"tensors {pair[which]} and {name} are the same weight")
        pair[which] = name
    for pair in pairs.values():
        for which, partner in (("A", "B"), ("B", "A")):
            if which in pair and partner not in pair:
                raise refuse(folder, f"tensor {pair[which]} has no matching lora_{partner}")
        if "A" not in pair:
            raise refuse(folder, f"tensor {pair[MAGNITUDE]} has no matching lora_A and lora_B")
    return pairs


def _parse_tensor_name(name: str, arch: ModelArch, folder: Path) -> tuple[int, int, str]:
    if "lora_embedding" in name or "embed_tokens" in name:
        raise refuse(folder, f"tensor {name} adapts the embedding; not supported")
    if "lm_head" in name:
        raise refuse(folder, f"tensor {name} adapts lm_head; not supported")
    match = TENSOR_NAME.fullmatch(name)
    module = match.group("module") if match else ""
    if (
        match is None
        or module not in arch.linear_modules
        or linear_parent(module) != match.group("parent")
    ):
        raise refuse(
            folder,
            f"unexpected tensor {name} (not a LoRA A/B of {', '.join(arch.linear_modules)})",
        )
    layer = int(match.group("layer"))
    if layer >= arch.num_layers:
        raise refuse(
            folder, f"tensor {name} is for layer {layer}, the model has {arch.num_layers} layers"
        )
    return layer, arch.linear_modules.index(module), match.group("which") or MAGNITUDE


def _checked_module(
    folder: Path,
    arch: ModelArch,
    where: tuple[int, int],
    target: _Target,
    pair: dict[str, str],
    tensors: dict[str, torch.Tensor],
    use_dora: bool,
) -> LoraModule:
    """One module's A and B (and DoRA magnitude) once their shapes, ranks and values are checked."""
    module = arch.linear_modules[where[1]]
    in_features, out_features = arch.module_dims(module)
    a_name, b_name = pair["A"], pair["B"]
    lora_a, lora_b = tensors[a_name], tensors[b_name]  # [r, in], [out, r]
    _check_shape(folder, a_name, lora_a, 1, (target.rank, in_features))
    _check_shape(folder, b_name, lora_b, 0, (out_features, target.rank))
    if lora_a.shape[0] != lora_b.shape[1]:
        raise refuse(
            folder, f"{a_name} has rank {lora_a.shape[0]} but {b_name} has rank {lora_b.shape[1]}"
        )
    if lora_a.shape[0] != target.rank:
        raise refuse(
            folder,
            f"{a_name} has rank {lora_a.shape[0]} but {CONFIG_FILE} gives {target.key} "
            f"rank {target.rank}",
        )
    for name, tensor in ((a_name, lora_a), (b_name, lora_b)):
        if not tensor.is_floating_point():
            raise refuse(folder, f"tensor {name} has dtype {tensor.dtype}; expected floats")
    magnitude = checked_magnitude(folder, target.key, pair, tensors, out_features, use_dora)
    return LoraModule(
        where[0],
        module,
        target.rank,
        target.scaling,
        lora_a,
        lora_b,
        a_name,
        b_name,
        magnitude,
        pair.get(MAGNITUDE, ""),
    )


def checked_magnitude(
    folder: Path,
    key: str,
    pair: dict[str, str],
    tensors: dict[str, torch.Tensor],
    out_features: int,
    use_dora: bool,
) -> torch.Tensor | None:
    """A DoRA module's magnitude vector m ([out_features] float32), None for plain LoRA."""
    name = pair.get(MAGNITUDE)
    if not use_dora:
        if name is not None:
            raise refuse(folder, f"tensor {name} is a DoRA magnitude but use_dora is not set")
        return None
    if name is None:
        raise refuse(folder, f"use_dora is set but {key} has no lora_magnitude_vector")
    magnitude = tensors[name]
    if tuple(magnitude.shape) != (out_features,):
        raise refuse(
            folder,
            f"DoRA magnitude {name} has shape {tuple(magnitude.shape)}, expected "
            f"({out_features},) (one per output feature of {key})",
        )
    if not magnitude.is_floating_point() or not torch.isfinite(magnitude).all():
        raise refuse(folder, f"DoRA magnitude {name} is not finite floats ({magnitude.dtype})")
    return magnitude.float()


def _check_shape(
    folder: Path, name: str, tensor: torch.Tensor, model_dim: int, expected: tuple[int, int]
) -> None:
    """Refuse a tensor whose base-model side (dim `model_dim`) does not fit the base model."""
    if tensor.ndim != 2 or tensor.shape[model_dim] != expected[model_dim]:
        raise refuse(
            folder,
            f"tensor {name} has shape {tuple(tensor.shape)}, expected {expected} "
            "for this base model",
        )
