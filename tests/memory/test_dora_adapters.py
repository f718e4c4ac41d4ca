"""DoRA folders in the host store: g = m / ||W + sBA|| against PEFT's own DoRA layers, its
place in the pages, the page count, the adapter's identity, and every refusal.

Adapters are written by PEFT (`make_adapter(use_dora=True)`, magnitudes moved off their
initial ||W + sBA||); the reference g is what PEFT's `DoraLinearLayer` of the loaded model
computes (`magnitude / get_weight_norm(W, B @ A, scaling)`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import make_adapter, make_model, peft_model_for
from test_adapter_store import Store, assert_refused, copy_adapter, edit_config, edit_tensors

from loraserve.errors import AdapterError
from loraserve.memory import adapter_store
from loraserve.memory import dora as dora_module
from loraserve.memory.adapter_store import NOT_TARGETED, AdapterReader, HostAdapter
from loraserve.memory.geometry import PoolGeometry
from loraserve.models.arch import FUSED_MODULES, LORA_MODULES, MODULE_INDEX, ModelArch
from loraserve.models.hf_config import load_arch

MAX_RANK = 16
DORA = dict(
    r=7,
    lora_alpha=12,
    use_dora=True,
    use_rslora=True,
    target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    rank_pattern={"v_proj": 3},
    alpha_pattern={"down_proj": 5},
)
LAYER_0_Q = "base_model.model.model.layers.0.self_attn.q_proj"


class HFWeights:
    """memory.dora.BaseWeights over a Hugging Face model (the runner's stand-in)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def base_weight(self, layer: int, module: str) -> torch.Tensor:
        decoder = self.model.model.layers[layer]
        parent = (
            decoder.mlp
            if module in ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
            else decoder.self_attn
        )
        return getattr(parent, module).weight.detach()


def new_store(arch: ModelArch, model: Any | None, dtype: torch.dtype = torch.float32) -> Store:
    geometry = PoolGeometry.for_model(arch, block_size=1, max_lora_rank=MAX_RANK)
    base_weights = None if model is None else HFWeights(model)
    return Store(AdapterReader(arch, geometry, MAX_RANK, dtype, base_weights=base_weights))


@pytest.fixture(scope="module", params=["llama-gqa", "phi3"])
def family(request, tmp_path_factory) -> tuple[Any, ModelArch, Path, Path]:
    """(HF model, arch, a DoRA folder, a plain LoRA folder) of a family (Phi-3: fused targets)."""
    root = tmp_path_factory.mktemp(request.param)
    model = make_model(root / "model", request.param)
    config = dict(DORA)
    if request.param == "phi3":
        config.update(target_modules=["qkv_proj", "o_proj", "gate_up_proj"], rank_pattern={})
    dora = make_adapter(model, root / "dora", seed=3, **config)
    plain = make_adapter(
        model, root / "plain", seed=4, r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]
    )
    return model, load_arch(root / "model"), dora, plain


def peft_scales(model: Any, folder: Path) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, module name) -> g [out] as PEFT's DoRA layer computes it."""
    scales = {}
    for name, layer in peft_model_for(model, folder).named_modules():
        if (
            not hasattr(layer, "lora_magnitude_vector")
            or "default" not in layer.lora_magnitude_vector
        ):
            continue
        dora = layer.lora_magnitude_vector["default"]
        lora_weight = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        norm = dora.get_weight_norm(
            layer.get_base_layer().weight, lora_weight, layer.scaling["default"]
        )
        parts = name.split(".")
        scales[int(parts[parts.index("layers") + 1]), parts[-1]] = (dora.weight / norm).detach()
    return scales


def stored_scale(host: HostAdapter, layer: int, slot: int, width: int) -> torch.Tensor:
    offset = int(host.local_offsets[layer, slot, 2])
    return host.pages.view(-1)[offset : offset + width]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scale_is_peft_magnitude_over_weight_norm(family, dtype: torch.dtype) -> None:
    model, arch, dora, _ = family
    host = new_store(arch, model, dtype).register("dora", dora)
    assert host.is_dora
    expected = peft_scales(model, dora)
    assert expected, "the adapter was meant to be DoRA"
    seen = set()
    for (layer, module), scale in expected.items():
        slots = FUSED_MODULES.get(module) or (MODULE_INDEX[module],)
        widths = [arch.module_dims(LORA_MODULES[slot])[1] for slot in slots]
        for slot, part in zip(slots, scale.split(widths), strict=True):
            ours = stored_scale(host, layer, slot, part.numel())
            assert ours.dtype == dtype
            torch.testing.assert_close(
                ours.float(), part.float().to(dtype).float(), rtol=1e-6, atol=0
            )
            seen.add((layer, slot))
        assert (scale - 1).abs().max() > 0.05, "g was meant to move off 1"
    targeted = {
        (layer, slot)
        for layer in range(arch.num_layers)
        for slot in range(len(LORA_MODULES))
        if host.ranks[layer, slot]
    }
    assert seen == targeted  # every adapted slot has its g; nothing else
    assert (host.local_offsets[..., 2][host.ranks == 0] == NOT_TARGETED).all()


def test_plain_adapter_has_no_scale_and_pages_fit_the_worst_case(family) -> None:
    model, arch, dora, plain = family
    store = new_store(arch, model)
    plain_host, dora_host = store.register("plain", plain), store.register("dora", dora)
    assert not plain_host.is_dora and (plain_host.local_offsets[..., 2] == NOT_TARGETED).all()
    reader = AdapterReader(
        arch, store.geometry, MAX_RANK, torch.float32, base_weights=HFWeights(model)
    )
    assert plain_host.num_pages < dora_host.num_pages <= reader.max_num_pages


def test_scale_is_part_of_the_identity(family, tmp_path, monkeypatch) -> None:
    """Same A and B, another magnitude: another digest (prefix caching keys on it), the
    files named by what they hold, not by their versions."""
    monkeypatch.setattr(adapter_store, "SETTLED_SECONDS", math.inf)
    model, arch, dora, _ = family
    store = new_store(arch, model)
    first = store.register("first", dora)
    moved = copy_adapter(dora, tmp_path / "moved")
    edit_tensors(moved, lambda t: [v.mul_(1.5) for k, v in t.items() if "magnitude" in k])
    second = store.register("second", moved)
    assert first.identity != second.identity
    assert torch.equal(first.ranks, second.ranks) and torch.equal(
        first.local_offsets, second.local_offsets
    )


def shorten_magnitude(tensors: dict[str, torch.Tensor]) -> None:
    tensors[f"{LAYER_0_Q}.lora_magnitude_vector"] = tensors[f"{LAYER_0_Q}.lora_magnitude_vector"][
        :-1
    ]


def test_refusals(tmp_path) -> None:
    """Each bad DoRA folder is refused naming the folder and the reason; the store unchanged."""
    root = tmp_path
    model = make_model(root / "model", "llama-gqa")
    arch = load_arch(root / "model")
    good = make_adapter(model, root / "good", seed=3, **DORA)
    store = new_store(arch, model)
    store.register("other", good)
    magnitude = f"{LAYER_0_Q}.lora_magnitude_vector"
    cases = [
        (
            lambda t: shorten_magnitude(t),
            r"DoRA magnitude .*q_proj.lora_magnitude_vector has shape \(63,\), expected \(64,\)",
        ),
        (lambda t: t[magnitude].fill_(float("nan")), "DoRA magnitude .* is not finite"),
        (
            lambda t: t.pop(magnitude),
            "use_dora is set but .*layers.0.self_attn.q_proj has no lora_magnitude_vector",
        ),
        (
            lambda t: t.update(
                {f"{LAYER_0_Q.replace('q_proj', 'k_proj')}.lora_magnitude_vector": torch.ones(16)}
            ),
            "k_proj.lora_magnitude_vector has no matching lora_A and lora_B",
        ),
    ]
    for index, (edit, match) in enumerate(cases):
        folder = copy_adapter(good, root / f"bad{index}")
        edit_tensors(folder, edit)
        assert_refused(store, folder, good, match)
    not_dora = copy_adapter(good, root / "not_dora")
    edit_config(not_dora, use_dora=False)
    assert_refused(store, not_dora, good, "is a DoRA magnitude but use_dora is not set")
    zero = copy_adapter(good, root / "zero")  # W + sBA with a zero row: nothing to divide by
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[3] = 0.0
    edit_tensors(zero, lambda t: t[f"{LAYER_0_Q}.lora_B.weight"][3].zero_())
    assert_refused(store, zero, good, r"over \|\|W \+ sBA\|\| is not finite .*norm zero")
    without_model = new_store(arch, None)
    with pytest.raises(AdapterError, match="needs the base model's weights"):
        without_model.register("dora", good)


def test_scale_in_row_chunks_is_the_same(family, monkeypatch) -> None:
    """g is computed a few rows at a time (bounded device memory): the same values, to
    float32 rounding (BLAS may block a 2-row product differently from a 64-row one: on AMD
    EPYC it does)."""
    model, arch, dora, _ = family
    whole = new_store(arch, model).register("dora", dora)
    monkeypatch.setattr(dora_module, "NORM_CHUNK_ELEMENTS", 100)  # one or two rows a time
    chunked = new_store(arch, model).register("dora", dora)
    torch.testing.assert_close(chunked.pages, whole.pages, rtol=2e-6, atol=1e-7)
