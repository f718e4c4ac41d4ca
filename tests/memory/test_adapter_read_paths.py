"""An adapter read the fast way (its layout cached, every matrix copied by one `_foreach` op)
gives the very bits of a plain reference: the same pages, offsets, ranks and digest (every
file here counts as just written, so each read is named by its pages' digest), for
every file dtype into every pool dtype, on the first read and on the cached ones, and so
does the module-by-module path that tensor parallelism and DoRA take; as do the copies in C
(`native_copies`, float32 into float32), and no read's pages share memory with the buffer
the next read fills."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import make_adapter, make_model
from safetensors.torch import load_file, save_file

from loraserve.errors import AdapterError
from loraserve.kernels import native
from loraserve.memory import adapter_layout, adapter_store
from loraserve.memory.adapter_store import NOT_TARGETED, AdapterReader, HostAdapter, pack_matrices
from loraserve.memory.geometry import PoolGeometry
from loraserve.memory.peft_format import read_peft_lora
from loraserve.models.arch import LORA_MODULES, NUM_LORA_MODULES, ModelArch
from loraserve.models.hf_config import load_arch

MAX_RANK = 16
CASES: dict[str, dict[str, Any]] = {
    "odd_rank_all_modules": dict(r=7, lora_alpha=16, target_modules=list(LORA_MODULES)),
    "patterns": dict(  # a scaling per module
        r=4,
        lora_alpha=8,
        target_modules=list(LORA_MODULES),
        rank_pattern={"q_proj": 16, "model.layers.1.mlp.down_proj": 3},
        alpha_pattern={"v_proj": 32, r"layers\.0\.self_attn\.o_proj": 5},
    ),
    "rslora_subset": dict(r=8, lora_alpha=3, use_rslora=True, target_modules=["k_proj", "up_proj"]),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def named_by_digest(monkeypatch) -> None:
    """No file settles: a read is named by its pages' digest (tests/memory/test_adapter_identity.py
    reads settled files)."""
    monkeypatch.setattr(adapter_store, "SETTLED_SECONDS", math.inf)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, ModelArch, Path]:
    root = tmp_path_factory.mktemp("adapter_read_paths")
    model = make_model(root / "model", "llama-gqa")
    return model, load_arch(root / "model"), root


def adapter_in(base: tuple[Any, ModelArch, Path], case: str, file_dtype: torch.dtype) -> Path:
    """CASES[case] written by PEFT, its tensors saved again in `file_dtype`."""
    model, _, root = base
    folder = root / f"{case}-{str(file_dtype).removeprefix('torch.')}"
    if not folder.exists():
        make_adapter(model, folder, seed=list(CASES).index(case), **CASES[case])
        weights = folder / "adapter_model.safetensors"
        tensors = {name: t.to(file_dtype) for name, t in load_file(weights).items()}
        save_file(tensors, weights, metadata={"format": "pt"})
    return folder


def reference(folder: Path, arch: ModelArch, geometry: PoolGeometry, dtype: torch.dtype):
    """(pages, local_offsets, ranks, digest) built the plain way, matrix by matrix in float32."""
    modules = read_peft_lora(folder, arch, MAX_RANK)
    sizes = []
    for module in modules:
        in_features, out_features = arch.module_dims(module.name)
        sizes += [module.rank * in_features, module.rank * out_features]
    offsets, num_pages = pack_matrices(sizes, geometry.page_numel)
    flat = torch.zeros(num_pages * geometry.page_numel, dtype=dtype)
    local_offsets = torch.full((arch.num_layers, NUM_LORA_MODULES, 3), NOT_TARGETED)
    ranks = torch.zeros(arch.num_layers, NUM_LORA_MODULES, dtype=torch.int32)
    for index, module in enumerate(modules):
        a_offset, b_offset = offsets[2 * index], offsets[2 * index + 1]
        lora_a = module.lora_a.float().to(dtype)  # [r, in]
        lora_b = (module.scaling * module.lora_b.float()).T.to(dtype)  # [r, out]
        flat[a_offset : a_offset + lora_a.numel()] = lora_a.reshape(-1)
        flat[b_offset : b_offset + lora_b.numel()] = lora_b.reshape(-1)
        (slot,) = module.slots
        local_offsets[module.layer, slot, :2] = torch.tensor([a_offset, b_offset])
        ranks[module.layer, slot] = module.rank
    pages = flat.view(1, num_pages, geometry.page_numel)
    digest = hashlib.sha256()
    for tensor in (pages, local_offsets, ranks):
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return pages, local_offsets, ranks, digest.digest()


def assert_same(host: HostAdapter, expected: tuple[torch.Tensor, ...]) -> None:
    pages, local_offsets, ranks, digest = expected
    assert host.pages.dtype == pages.dtype and host.pages.shape == pages.shape
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[pages.element_size()]
    assert torch.equal(host.pages.view(width), pages.view(width))  # bits: -0.0 and NaN too
    assert torch.equal(host.local_offsets, local_offsets)
    assert torch.equal(host.ranks, ranks)
    assert host.identity == digest


@pytest.mark.parametrize("pool_dtype", DTYPES)
@pytest.mark.parametrize("file_dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_fast_and_module_paths_give_the_reference_bits(
    base, case: str, file_dtype: torch.dtype, pool_dtype: torch.dtype
) -> None:
    _, arch, _ = base
    folder = adapter_in(base, case, file_dtype)
    geometry = PoolGeometry.for_model(arch, block_size=1, max_lora_rank=MAX_RANK)
    expected = reference(folder, arch, geometry, pool_dtype)
    reader = AdapterReader(arch, geometry, MAX_RANK, pool_dtype)
    first, cached = reader.read("a", folder), reader.read("b", folder)
    assert_same(first, expected)
    assert_same(cached, expected)
    modules = read_peft_lora(folder, arch, MAX_RANK)
    by_module = reader._pack("c", folder, modules, reader._layout(modules, None))
    assert_same(by_module, expected)


def test_a_header_not_padded_to_the_dtype_reads_module_by_module(base, tmp_path) -> None:
    """Tensors aligned in the file but not in the data after a header of odd length: the
    planned copies (views of the data as one dtype) do not apply; the read is still exact."""
    _, arch, _ = base
    source = adapter_in(base, "odd_rank_all_modules", torch.float32)
    folder = tmp_path / "odd-header"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes((source / "adapter_config.json").read_bytes())
    raw = (source / "adapter_model.safetensors").read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    for name, entry in header.items():
        if name != "__metadata__":
            entry["data_offsets"] = [offset + 2 for offset in entry["data_offsets"]]
    encoded = json.dumps(header).encode()
    encoded += b" " * ((2 - len(encoded)) % 4)  # 8 + header + 2 bytes of padding: aligned data
    assert (8 + len(encoded)) % 4 == 2
    data = b"\0\0" + raw[8 + length :]
    (folder / "adapter_model.safetensors").write_bytes(
        len(encoded).to_bytes(8, "little") + encoded + data
    )
    geometry = PoolGeometry.for_model(arch, block_size=1, max_lora_rank=MAX_RANK)
    expected = reference(source, arch, geometry, torch.float32)
    reader = AdapterReader(arch, geometry, MAX_RANK, torch.float32)
    assert_same(reader.read("a", folder), expected)
    assert_same(reader.read("b", folder), expected)


needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler")


@needs_native
@pytest.mark.parametrize("case", list(CASES))
def test_copies_in_c_give_the_reference_bits(base, case: str, monkeypatch) -> None:
    _, arch, _ = base
    folder = adapter_in(base, case, torch.float32)
    geometry = PoolGeometry.for_model(arch, block_size=1, max_lora_rank=MAX_RANK)
    packed = []
    pack = native.pack_copies
    monkeypatch.setattr(native, "pack_copies", lambda *args: packed.append(pack(*args)))
    reader = AdapterReader(arch, geometry, MAX_RANK, torch.float32, native_copies=True)
    expected = reference(folder, arch, geometry, torch.float32)
    assert_same(reader.read("a", folder), expected)  # works out the layout, then copies
    assert_same(reader.read("b", folder), expected)  # the layout cached
    assert len(packed) == 2  # both reads' copies went through C


@pytest.mark.parametrize("native_copies", [False, pytest.param(True, marks=needs_native)])
def test_a_read_keeps_its_pages_when_the_next_read_reuses_the_buffer(
    base, native_copies: bool
) -> None:
    """Files are read into the reading thread's reused buffer: what a read returns holds
    copies, not views of it, so a second folder read on the same thread leaves the first
    adapter's pages as they were."""
    _, arch, _ = base
    geometry = PoolGeometry.for_model(arch, block_size=1, max_lora_rank=MAX_RANK)
    reader = AdapterReader(arch, geometry, MAX_RANK, torch.float32, native_copies=native_copies)
    folders = [adapter_in(base, case, torch.float32) for case in CASES]
    hosts = [reader.read(f"a{index}", folder) for index, folder in enumerate(folders)]
    hosts += [reader.read(f"b{index}", folder) for index, folder in enumerate(folders)]
    for host, folder in zip(hosts, folders * 2, strict=True):
        assert_same(host, reference(folder, arch, geometry, torch.float32))


@pytest.mark.parametrize("native_copies", [False, pytest.param(True, marks=needs_native)])
@pytest.mark.parametrize(
    ("which", "value", "match"),
    [
        ("lora_B", float("inf"), "lora_B.weight contains NaN or inf"),
        ("lora_A", 60_000.0, r"lora_A.weight has entries of magnitude 6e\+04 once scaled"),
    ],
)
def test_a_cached_layout_still_checks_values(
    base, tmp_path, which: str, value: float, match: str, native_copies: bool
) -> None:
    """A folder whose header and config a read already worked out is refused for its
    values as any other, with the same message."""
    _, arch, _ = base
    good = adapter_in(base, "odd_rank_all_modules", torch.float32)
    geometry = PoolGeometry.for_model(arch, block_size=1, max_lora_rank=MAX_RANK)
    reader = AdapterReader(arch, geometry, MAX_RANK, torch.float32, native_copies=native_copies)
    reader.read("good", good)
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    raw = bytearray((bad / "adapter_model.safetensors").read_bytes())
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    name = min(name for name in header if f".{which}." in name)
    begin = 8 + length + header[name]["data_offsets"][0]
    raw[begin : begin + 4] = struct.pack("<f", value)  # the header as it was: the same layout
    (bad / "adapter_model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(AdapterError, match=match):
        reader.read("bad", bad)
    assert_same(reader.read("good-again", good), reference(good, arch, geometry, torch.float32))


def test_the_layout_cache_keeps_the_layouts_used_last(monkeypatch) -> None:
    """Least recently used out: a layout thousands of adapters share stays however many
    others pass through."""
    monkeypatch.setattr(adapter_layout, "MAX_CACHED_LAYOUTS", 2)
    cache = adapter_layout.LayoutCache()
    shared, other, third = (object() for _ in range(3))  # stand-ins: the cache never reads them
    cache.put((b"shared", 1, ""), shared)  # type: ignore[arg-type]
    cache.put((b"other", 1, ""), other)  # type: ignore[arg-type]
    assert cache.get((b"shared", 1, "")) is shared
    cache.put((b"third", 1, ""), third)  # type: ignore[arg-type]
    assert cache.get((b"shared", 1, "")) is shared
    assert cache.get((b"other", 1, "")) is None
    assert cache.get((b"third", 1, "")) is third
