"""The host adapter store against PEFT itself: layout, scaling, and every refusal.

Adapters are written by PEFT (`make_adapter`); reading each matrix back out of the
packed pages must give PEFT's `lora_A` and `(scaling * lora_B).T`, with `scaling`
taken from the loaded PEFT model, so our rank/alpha/rsLoRA rules are pinned to PEFT's.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import make_adapter, make_model, peft_model_for, tiny_config
from safetensors.torch import load_file, save_file

from loraserve.errors import AdapterError, UnknownAdapterError
from loraserve.memory.adapter_catalog import AdapterCatalog
from loraserve.memory.adapter_loader import AdapterLoader
from loraserve.memory.adapter_store import NOT_TARGETED, AdapterReader, HostAdapter, pack_matrices
from loraserve.memory.geometry import MATRIX_ALIGNMENT, PoolGeometry, round_up
from loraserve.models.arch import LORA_MODULES, MODULE_INDEX, ModelArch
from loraserve.models.hf_config import load_arch

MAX_RANK = 16
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"

PACKING_CASES: dict[str, dict[str, Any]] = {
    "odd_rank_all_modules": dict(r=7, lora_alpha=16, target_modules=list(LORA_MODULES)),
    "rslora": dict(r=8, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj"]),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=list(LORA_MODULES),
        # "proj" matches nothing: PEFT wants a whole dot-separated suffix.
        rank_pattern={"q_proj": 16, "model.layers.1.mlp.down_proj": 3, "proj": 2},
        alpha_pattern={"v_proj": 32, r"layers\.0\.self_attn\.o_proj": 5},
    ),
    "rslora_patterns": dict(
        r=7,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["k_proj", "up_proj", "o_proj"],
        rank_pattern={"k_proj": 2},
        alpha_pattern={"up_proj": 3},
    ),
    "regex_target": dict(
        r=5, lora_alpha=10, target_modules=r".*layers\.1\.(self_attn\.k_proj|mlp\.up_proj)"
    ),
    "subset": dict(r=6, lora_alpha=12, target_modules=["o_proj", "gate_proj"]),
    "layers_to_transform": dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]
    ),
    "exclude_modules": dict(
        r=4, lora_alpha=8, target_modules=["up_proj", "v_proj"], exclude_modules=["1.mlp.up_proj"]
    ),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, ModelArch, Path]:
    """The HF base model, its arch, and a scratch folder for this module's adapters."""
    root = tmp_path_factory.mktemp("adapter_store")
    model = make_model(root / "model", "llama-gqa")
    return model, load_arch(root / "model"), root


@pytest.fixture(scope="module")
def adapter_folder(base: tuple[Any, ModelArch, Path]) -> Callable[[str], Path]:
    """PACKING_CASES name -> its PEFT folder, written once per module."""
    model, _, root = base
    cache: dict[str, Path] = {}

    def folder(case: str) -> Path:
        if case not in cache:
            cache[case] = make_adapter(model, root / case, seed=len(cache), **PACKING_CASES[case])
        return cache[case]

    return folder


class Store:
    """A catalog whose registrations are read at once, as start-up registers adapters."""

    def __init__(self, reader: AdapterReader) -> None:
        self.catalog = AdapterCatalog(AdapterLoader(reader, num_workers=0))
        self.geometry = reader.geometry

    def register(self, name: str, path: str | Path) -> HostAdapter:
        self.catalog.register(name, path)
        try:
            return self.catalog.read_now(name)
        except AdapterError:
            self.catalog.unregister(name)
            raise

    def get(self, name: str) -> HostAdapter:
        return self.catalog.host(name)

    def unregister(self, name: str) -> None:
        self.catalog.unregister(name)

    def names(self) -> list[str]:
        return self.catalog.names()

    def __contains__(self, name: str) -> bool:
        return name in self.catalog

    def __len__(self) -> int:
        return len(self.catalog)


def new_store(arch: ModelArch, dtype: torch.dtype = torch.float32) -> Store:
    # block_size 1 keeps pages small (one rank-16 matrix), so packing crosses many pages.
    geometry = PoolGeometry.for_model(arch, block_size=1, max_lora_rank=MAX_RANK)
    return Store(AdapterReader(arch, geometry, MAX_RANK, dtype))


def read_matrix(host: HostAdapter, layer: int, module: int, which: int, dim: int) -> torch.Tensor:
    rank = int(host.ranks[layer, module])
    offset = int(host.local_offsets[layer, module, which])
    return host.pages.view(-1)[offset : offset + rank * dim].view(rank, dim)  # [rank, dim]


def peft_reference(model: Any, folder: Path) -> dict[tuple[int, int], tuple[Any, ...]]:
    """(layer, module) -> (lora_A [r, in], lora_B [out, r], scaling) from PEFT's loaded model."""
    reference = {}
    for name, layer in peft_model_for(model, folder).named_modules():
        if hasattr(layer, "lora_A") and "default" in layer.lora_A:
            match = re.search(r"layers\.(\d+)\.\w+\.(\w+)$", name)
            assert match is not None, name
            where = (int(match.group(1)), MODULE_INDEX[match.group(2)])
            lora_a = layer.lora_A["default"].weight.detach()
            lora_b = layer.lora_B["default"].weight.detach()
            reference[where] = (lora_a, lora_b, layer.scaling["default"])
    return reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(PACKING_CASES))
def test_pages_hold_peft_matrices(base, adapter_folder, case: str, dtype: torch.dtype) -> None:
    model, arch, _ = base
    folder = adapter_folder(case)
    host = new_store(arch, dtype).register(case, folder)
    reference = peft_reference(model, folder)
    assert reference, "PEFT adapted nothing: the case is wrong"
    assert host.pages.dtype == dtype
    adapted = {tuple(where) for where in (host.ranks > 0).nonzero().tolist()}
    assert adapted == set(reference)
    for (layer, module), (lora_a, lora_b, scaling) in reference.items():
        in_features, out_features = arch.module_dims(LORA_MODULES[module])
        assert host.ranks[layer, module] == lora_a.shape[0]
        expected_b = (scaling * lora_b).T.to(dtype)  # [r, out]
        assert torch.equal(read_matrix(host, layer, module, 0, in_features), lora_a.to(dtype))
        assert torch.equal(read_matrix(host, layer, module, 1, out_features), expected_b)
    not_adapted = host.ranks == 0
    assert (host.local_offsets[not_adapted] == NOT_TARGETED).all()
    assert host.max_rank == max(a.shape[0] for a, _, _ in reference.values())
    expected_modules = sorted({module for _, module in reference})
    assert host.target_modules == tuple(LORA_MODULES[module] for module in expected_modules)


@pytest.mark.parametrize("case", ["odd_rank_all_modules", "patterns", "subset"])
def test_packing_is_greedy_aligned_and_zero_elsewhere(base, adapter_folder, case: str) -> None:
    _, arch, _ = base
    store = new_store(arch)
    host = store.register(case, adapter_folder(case))
    page_numel = store.geometry.page_numel
    used = torch.zeros(host.pages.numel(), dtype=torch.bool)
    previous_page, previous_end = 0, 0  # end: element just past the last matrix, in its page
    for layer, module in (host.ranks > 0).nonzero().tolist():  # (layer, module) order
        dims = arch.module_dims(LORA_MODULES[module])
        for which, dim in enumerate(dims):
            numel = int(host.ranks[layer, module]) * dim
            page, start = divmod(int(host.local_offsets[layer, module, which]), page_numel)
            aligned = round_up(previous_end, MATRIX_ALIGNMENT)
            if page == previous_page:
                assert start == aligned
            else:  # a new page only when the matrix did not fit the current one
                assert (page, start) == (previous_page + 1, 0)
                assert aligned + numel > page_numel
            assert start % MATRIX_ALIGNMENT == 0 and start + numel <= page_numel
            offset = page * page_numel + start
            assert not used[offset : offset + numel].any()
            used[offset : offset + numel] = True
            previous_page, previous_end = page, start + numel
    assert host.num_pages == previous_page + 1 > 1
    assert (host.pages.view(-1)[~used] == 0).all()


def test_pack_matrices_example() -> None:
    # The module docstring's example: rank 7, hidden 64, kv 32, page_numel 768.
    offsets, num_pages = pack_matrices([448, 448, 448, 224], 768)
    assert offsets == [0, 768, 1536, 1984] and num_pages == 3
    assert pack_matrices([], 768) == ([], 0)
    assert pack_matrices([1, 1], 128) == ([0, 64], 1)


def test_all_linear_and_default_infix_read_like_plain_peft(base, adapter_folder, tmp_path) -> None:
    _, arch, _ = base
    store = new_store(arch)
    plain = store.register("plain", adapter_folder("odd_rank_all_modules"))
    folder = copy_adapter(adapter_folder("odd_rank_all_modules"), tmp_path / "variant")
    edit_config(folder, target_modules="all-linear")
    edit_tensors(
        folder, lambda t: {k.replace(".weight", ".default.weight"): v for k, v in t.items()}
    )
    variant = store.register("variant", folder)
    assert torch.equal(variant.pages, plain.pages)
    assert torch.equal(variant.local_offsets, plain.local_offsets)
    assert torch.equal(variant.ranks, plain.ranks)


def test_register_get_unregister(base, adapter_folder) -> None:
    _, arch, _ = base
    store = new_store(arch)
    host = store.register("a", str(adapter_folder("subset")))
    store.register("b", adapter_folder("rslora"))
    assert store.get("a") is host and host.name == "a" and "a" in store and len(store) == 2
    assert store.names() == ["a", "b"] and host.path == str(adapter_folder("subset"))
    store.unregister("a")
    assert "a" not in store and store.names() == ["b"]
    with pytest.raises(UnknownAdapterError, match="'a' is not in host RAM"):
        store.get("a")
    with pytest.raises(UnknownAdapterError, match="'a' is not registered"):
        store.unregister("a")


# -- refusals ------------------------------------------------------------------------------


def copy_adapter(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    return folder


def edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / CONFIG).read_text())
    (folder / CONFIG).write_text(json.dumps({**config, **changes}))


def edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], Any]) -> None:
    """Rewrite the safetensors file with `edit(tensors)` (its result, or the dict edited in place)."""
    tensors = load_file(folder / WEIGHTS)
    edited = edit(tensors)
    save_file(edited if isinstance(edited, dict) else tensors, folder / WEIGHTS)


def assert_refused(store: Store, folder: Path, good: Path, match: str) -> None:
    """Refused with `match` naming the folder; the store unchanged; the name still usable."""
    before = store.names()
    with pytest.raises(AdapterError, match=match) as refused:
        store.register("tenant", folder)
    assert f"'{folder}'" in str(refused.value)
    assert store.names() == before and len(store) == len(before) and "tenant" not in store
    store.register("tenant", good)
    assert store.names() == [*before, "tenant"]
    store.unregister("tenant")  # so one test can check several refusals


@pytest.fixture
def refusal(base, adapter_folder, tmp_path):
    """(store with one adapter, a good folder to copy, a fresh folder path)."""
    _, arch, _ = base
    store = new_store(arch)
    store.register("other", adapter_folder("subset"))
    return store, adapter_folder("odd_rank_all_modules"), tmp_path / "bad"


CONFIG_REFUSALS: list[tuple[dict[str, Any], str]] = [
    ({"peft_type": "IA3"}, "peft_type is 'IA3'; only LORA"),
    ({"use_dora": True}, "use_dora is set but .*q_proj has no lora_magnitude_vector"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias 'all' is not supported"),
    ({"bias": "lora_only"}, "bias 'lora_only' is not supported"),
    ({"lora_bias": True}, "lora_bias"),
    ({"target_parameters": ["model.layers.0.mlp.down_proj.weight"]}, "target_parameters"),
    ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, r"embedding \(embed_tokens\)"),
    ({"target_modules": ".*(embed_tokens|q_proj)"}, r"embedding \(embed_tokens\)"),
    ({"target_modules": ["q_proj", "lm_head"]}, "targets lm_head"),
    ({"target_modules": ["mlp"]}, "matches model.layers.0.mlp, which is not one of"),
    ({"target_modules": r".*layers\.0\.self_attn"}, "matches model.layers.0.self_attn, which"),
    ({"target_modules": ["c_attn"]}, "matches no module"),
    ({"target_modules": "(q_proj"}, "not a valid regex"),
    ({"r": 6}, "q_proj.lora_A.weight has rank 7 but adapter_config.json gives .* rank 6"),
    ({"lora_alpha": 1e38}, r"lora_B.weight has entries of magnitude .* once scaled \(scaling"),
    ({"rank_pattern": {"down_proj": 32}}, "rank 32 of .*down_proj is above max_lora_rank 16"),
]


@pytest.mark.parametrize(("changes", "match"), CONFIG_REFUSALS)
def test_refuses_config(refusal, changes: dict[str, Any], match: str) -> None:
    store, good, folder = refusal
    edit_config(copy_adapter(good, folder), **changes)
    assert_refused(store, folder, good, match)


def set_first(tensors: dict[str, torch.Tensor], suffix: str, value: float) -> None:
    name = next(name for name in sorted(tensors) if name.endswith(suffix))
    tensors[name][0, 0] = value


LAYER_0_Q = "base_model.model.model.layers.0.self_attn.q_proj"
TENSOR_REFUSALS: list[tuple[Callable[[dict[str, torch.Tensor]], Any], str]] = [
    (lambda t: set_first(t, "lora_A.weight", float("nan")), "lora_A.weight contains NaN or inf"),
    (lambda t: set_first(t, "lora_B.weight", float("inf")), "lora_B.weight contains NaN or inf"),
    (
        lambda t: set_first(t, "lora_A.weight", 60_000.0),
        "lora_A.weight has entries of magnitude 6e\\+04 once scaled .* max_adapter_weight 10000",
    ),
    (lambda t: t.pop(f"{LAYER_0_Q}.lora_B.weight"), "q_proj.lora_A.weight has no matching lora_B"),
    (
        lambda t: {k.replace("layers.1.", "layers.2."): v for k, v in t.items()},
        "layers.2.mlp.down_proj.lora_A.weight is for layer 2, the model has 2 layers",
    ),
    (
        lambda t: t.update({f"{LAYER_0_Q}.lora_B.weight": torch.ones(64, 6)}),
        "q_proj.lora_A.weight has rank 7 but .*q_proj.lora_B.weight has rank 6",
    ),
    (
        lambda t: t.update(
            {"base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(7, 9)}
        ),
        "lora_embedding_A adapts the embedding",
    ),
    (
        lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.ones(7, 64)}),
        "lm_head.lora_A.weight adapts lm_head",
    ),
    (
        lambda t: t.update({f"{LAYER_0_Q}.lora_magnitude_vector": torch.ones(64)}),
        "q_proj.lora_magnitude_vector is a DoRA magnitude but use_dora is not set",
    ),
    (
        lambda t: [t.pop(f"{LAYER_0_Q}.lora_{which}.weight") for which in "AB"],
        "targets model.layers.0.self_attn.q_proj but the weights have no tensors",
    ),
    (
        lambda t: t.update({f"{LAYER_0_Q}.lora_A.weight": torch.ones(7, 64, dtype=torch.int32)}),
        "q_proj.lora_A.weight has dtype torch.int32",
    ),
]


@pytest.mark.parametrize(("edit", "match"), TENSOR_REFUSALS)
def test_refuses_tensors(refusal, edit, match: str) -> None:
    store, good, folder = refusal
    edit_tensors(copy_adapter(good, folder), edit)
    assert_refused(store, folder, good, match)


def test_refuses_tensor_of_untargeted_module(refusal) -> None:
    store, good, folder = refusal
    edit_config(copy_adapter(good, folder), target_modules=list(LORA_MODULES[1:]))
    match = "q_proj.lora_A.weight is for a module that adapter_config.json does not target"
    assert_refused(store, folder, good, match)


def test_refuses_adapter_for_bigger_hidden_size(base, refusal) -> None:
    from transformers import AutoModelForCausalLM

    model, _, _ = base
    store, good, folder = refusal
    config = tiny_config("llama-gqa", model.config.vocab_size, hidden_size=128)
    bigger = AutoModelForCausalLM.from_config(config)
    make_adapter(bigger, folder, r=7, lora_alpha=16, target_modules=["q_proj"])
    match = r"layers.0.self_attn.q_proj.lora_A.weight has shape \(7, 128\), expected \(7, 64\)"
    assert_refused(store, folder, good, match)


def test_refuses_rank_above_limit(base, refusal) -> None:
    model, _, _ = base
    store, good, folder = refusal
    make_adapter(model, folder, r=32, lora_alpha=16, target_modules=["v_proj"])
    assert_refused(store, folder, good, "rank 32 of .*v_proj is above max_lora_rank 16")


def test_refuses_overflow_in_half_precision_and_absurd_entries_in_any(
    base, adapter_folder, tmp_path
) -> None:
    _, arch, _ = base
    good = adapter_folder("odd_rank_all_modules")
    folder = copy_adapter(good, tmp_path / "big")
    edit_tensors(folder, lambda t: set_first(t, "lora_B.weight", 1e5))
    assert_refused(new_store(arch, torch.float16), folder, good, "overflows torch.float16")
    assert_refused(new_store(arch, torch.float32), folder, good, "entries of magnitude")


def test_refuses_missing_or_broken_folder(refusal, tmp_path) -> None:
    store, good, folder = refusal
    assert_refused(store, folder, good, "no such folder")
    (tmp_path / "file").write_text("not a folder")
    assert_refused(store, tmp_path / "file", good, "not a folder")
    copy_adapter(good, folder)
    (folder / CONFIG).unlink()
    assert_refused(store, folder, good, "adapter_config.json is missing")
    (folder / CONFIG).write_text("{not json")
    assert_refused(store, folder, good, "adapter_config.json is not valid JSON")


def test_refuses_pickle_weights_without_reading_them(refusal) -> None:
    store, good, folder = refusal
    copy_adapter(good, folder)
    (folder / WEIGHTS).unlink()
    assert_refused(store, folder, good, "adapter_model.safetensors is missing")
    # Not a pickle at all: unpickling it would fail differently.
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04garbage")
    assert_refused(
        store, folder, good, "only adapter_model.bin found; convert it to adapter_model.safetensors"
    )
    (folder / WEIGHTS).write_bytes(b"\x00" * 16)
    assert_refused(store, folder, good, "cannot read adapter_model.safetensors")


def test_refuses_duplicate_and_bad_names(refusal) -> None:
    store, good, _ = refusal
    with pytest.raises(AdapterError, match="'other' is already registered"):
        store.register("other", good)
    for name in ["two words", "a,b", "tab\there"]:
        with pytest.raises(AdapterError, match="without whitespace or ','"):
            store.register(name, good)
    assert store.names() == ["other"]
