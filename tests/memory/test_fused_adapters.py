"""Adapters of a model with fused projections (Phi-3: qkv_proj, gate_up_proj), against PEFT.

PEFT puts one LoRA on a fused module: A `[r, hidden]`, B `[q + 2 kv, r]` over the fused
output. The store keeps that A once and B's rows split per part, so that the q/k/v (and
gate/up) slices of the LoRA launch read the same A and their own rows of B.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from factories import make_adapter, make_model, peft_model_for
from test_adapter_store import new_store, read_matrix

from loraserve.errors import AdapterError
from loraserve.models.arch import FUSED_MODULES, LORA_MODULES, MODULE_INDEX, ModelArch
from loraserve.models.config import load_arch


@pytest.fixture(scope="module")
def phi3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, ModelArch, Path]:
    root = tmp_path_factory.mktemp("phi3")
    model = make_model(root / "model", "phi3")
    return model, load_arch(root / "model"), root


def peft_modules(model: Any, folder: Path) -> dict[tuple[int, str], tuple[Any, ...]]:
    """(layer, module name) -> (lora_A [r, in], lora_B [out, r], scaling) as PEFT loads them."""
    found = {}
    for name, module in peft_model_for(model, folder).named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            layer = int(name.split("layers.")[1].split(".")[0])
            weights = (module.lora_A["default"].weight, module.lora_B["default"].weight)
            found[(layer, name.rsplit(".", 1)[1])] = (*weights, module.scaling["default"])
    return found


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_modules_share_one_a_and_split_b(phi3, dtype: torch.dtype) -> None:
    model, arch, root = phi3
    folder = make_adapter(
        model, root / f"all-{dtype}", r=5, lora_alpha=10, target_modules="all-linear",
        rank_pattern={"gate_up_proj": 3},
    )  # fmt: skip
    host = new_store(arch, dtype).register("all", folder)
    assert host.target_modules == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    reference = peft_modules(model, folder)
    assert len(reference) == 4 * arch.num_layers
    for (layer, name), (lora_a, lora_b, scaling) in reference.items():
        slots = FUSED_MODULES.get(name) or (MODULE_INDEX[name],)
        expected_b = (scaling * lora_b.detach()).T.to(dtype)  # [r, out of the fused module]
        a_offsets = {int(host.local_offsets[layer, slot, 0]) for slot in slots}
        assert len(a_offsets) == 1, "the parts of a fused module read one A"
        column = 0
        for slot in slots:
            in_features, width = arch.module_dims(LORA_MODULES[slot])
            assert host.ranks[layer, slot] == lora_a.shape[0]
            a = read_matrix(host, layer, slot, 0, in_features)
            assert torch.equal(a, lora_a.detach().to(dtype))
            b = read_matrix(host, layer, slot, 1, width)
            assert torch.equal(b, expected_b[:, column : column + width])
            column += width
        assert column == expected_b.shape[1]


def test_fused_and_plain_module_names_are_the_models(phi3) -> None:
    """On Phi-3 an adapter may target its fused modules and o_proj / down_proj; q_proj and
    friends do not exist there (PEFT would find no such module either)."""
    model, arch, root = phi3
    store = new_store(arch)
    subset = make_adapter(model, root / "subset", r=4, target_modules=["qkv_proj", "down_proj"])
    host = store.register("subset", subset)
    assert host.target_modules == ("qkv_proj", "down_proj")
    assert (host.ranks[:, [MODULE_INDEX["o_proj"], *FUSED_MODULES["gate_up_proj"]]] == 0).all()
    (subset / "adapter_config.json").write_text(
        (subset / "adapter_config.json").read_text().replace('"qkv_proj"', '"q_proj"')
    )
    with pytest.raises(AdapterError, match=r"qkv_proj.* is for a module that .* does not target"):
        store.register("renamed", subset)
