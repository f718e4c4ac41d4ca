"""Reading an adapter into host RAM, already in the pool's layout (`HostAdapter`).

An adapter is read from its PEFT folder (memory/peft_format.py), converted to the
pool's dtype with its scaling folded into B, and packed into page-sized slabs, so
that bringing it into the GPU pool is one copy per page. `AdapterReader` holds no
adapters: it is safe to call from the catalog's loader threads while the engine
steps (memory/adapter_catalog.py keeps what was read, within the host-RAM budget).

Layout inside `HostAdapter.pages` (the contract with the LoRA kernels): every matrix
is row-major `[rank, dim]`: A as PEFT stores it (`[r, in_features]`), B transposed
with the scaling folded in (`(scaling * lora_B).T`, `[r, out_features]`). Matrices
are packed greedily in (layer, module, A then B) order, each starting at a multiple
of MATRIX_ALIGNMENT elements of its page and never straddling two pages. Example,
rank 7, hidden 64, kv 32, page_numel 768:

    A q_proj [7, 64] (448 elements)  -> page 0 at 0                 offset 0
    B q_proj [7, 64] (448)           -> 448 + 448 > 768: page 1 at 0 offset 768
    A k_proj [7, 64] (448)           -> page 2 at 0                 offset 1536
    B k_proj [7, 32] (224)           -> page 2 at 448 (7 * 64)      offset 1984

Unused elements are zero.

A DoRA module (memory/dora.py) adds its magnitude scale g = m / ||W + sBA||, `[out_i]` per
slot, stored as one more `[1, out_i]` matrix after its B(s); its offset is the third entry
of `local_offsets` (NOT_TARGETED for plain LoRA modules, whose expand g never touches).

A fused module's adapter (Phi-3's `qkv_proj`: one A, one B over the q/k/v output) is
stored as its parts' slices: its A once, its B split by rows into one `[r, out_i]`
matrix per part, and the parts' A offsets all point at that one A.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loraserve.errors import AdapterError
from loraserve.memory.adapter_dir import is_servable_name
from loraserve.memory.dora import BaseWeights, magnitude_scale
from loraserve.memory.geometry import MATRIX_ALIGNMENT, PoolGeometry, round_up
from loraserve.memory.peft_config import SAFETENSORS_FILE, check_features, read_config, refuse
from loraserve.memory.peft_format import LoraModule, check_peft_lora, layout_config, load_tensors
from loraserve.memory.safetensors_map import SafetensorsFile, SafetensorsFormatError
from loraserve.models.arch import LORA_MODULES, NUM_LORA_MODULES, ModelArch
from loraserve.models.tensor_parallel import Shard, shard_arch, shard_linear

NOT_TARGETED = -1
"""`local_offsets` entry of a module the adapter does not adapt."""
MAX_FOLDED_MAGNITUDE = 1e4
"""Largest entry of A or of scaled B that an adapter may hold by default. PEFT starts A near
±1/sqrt(in_features) and B at zero, and trained adapters' scaled entries stay within ~10;
an adapter past this bound (`lora_alpha: 1e38`, weights of 60,000) is a corrupt or absurd
file whose output would be overflow or noise: it is refused, naming the tensor."""
HELD_BY_FLOAT32 = frozenset({torch.float32, torch.float16, torch.bfloat16})
"""File dtypes whose every value a float32 holds: copied into float32, nothing rounds."""
MAX_CACHED_LAYOUTS = 64
"""Layouts a reader keeps (`_LayoutCache`): thousands of adapters trained alike share a few."""


@dataclass(frozen=True)
class HostAdapter:
    """A registered adapter in host RAM, in the pool's dtype and page layout."""

    name: str
    path: str
    pages: torch.Tensor
    """[shards, num_pages, page_numel], pool dtype, CPU (pinned when the store pins): one slab
    set per tensor-parallel rank, each that rank's shard in the same layout (1 on one device;
    1, its own, in what a rank's process is sent: `rank_slabs`)."""
    local_offsets: torch.Tensor
    """[num_layers, NUM_LORA_MODULES, 3] int64: element offset of A (0), B (1) and DoRA's g (2)
    from the start of `pages` (page index * page_numel + offset in page); NOT_TARGETED (-1)
    where the module is not adapted (A, B, g) or not DoRA (g)."""
    ranks: torch.Tensor
    """[num_layers, NUM_LORA_MODULES] int32; 0 where the module is not adapted."""
    max_rank: int
    target_modules: tuple[str, ...]
    """Names (the model's `linear_modules` order) of the modules adapted in at least one layer."""
    digest: bytes
    """SHA-256 of its pages, offsets and ranks: its identity for prefix caching (the KV its
    requests compute depends on exactly these), new when other weights are read under its name."""

    def rank_slabs(self, rank: int) -> HostAdapter:
        """The same adapter with only tensor-parallel rank `rank`'s slabs (`pages` of one shard,
        a copy: what is sent to that rank's process)."""
        return dataclasses.replace(self, pages=self.pages[rank : rank + 1].clone())

    @property
    def is_dora(self) -> bool:
        """Whether any module is DoRA (carries a magnitude scale g)."""
        return bool((self.local_offsets[..., 2] != NOT_TARGETED).any())

    @property
    def num_pages(self) -> int:
        """Pages the adapter takes in the pool."""
        return int(self.pages.shape[1])

    @property
    def num_bytes(self) -> int:
        """Host RAM its pages take (what the host tier's byte budget counts)."""
        return self.pages.numel() * self.pages.element_size()


@dataclass(frozen=True)
class _Copy:
    """One matrix copied from the mapped file into the pages: `shape` elements read at
    `stride` from element `source` of the file's data (as `dtype`), written row-major from
    element `target` of the pages."""

    dtype: torch.dtype
    shape: tuple[int, int]
    stride: tuple[int, int]
    source: int
    target: int


@dataclass(frozen=True)
class _Copies:
    """Every copy of an adapter: the A's, then the B's (transposed reads), and the scaling
    the B's get (one float when all share it, else one per B). A pool dtype narrower than
    float32 has the B's scaled in a float32 buffer, `staging[i]` the offset of B i in it,
    then rounded once into the pages (as `_scaled_copy` does)."""

    copies: tuple[_Copy, ...]
    num_a: int
    scalings: float | list[float]
    dtypes: frozenset[torch.dtype]
    staging: tuple[int, ...] | None


@dataclass(frozen=True)
class _Layout:
    """Where an adapter's matrices go (what `HostAdapter` records of it but its pages): the
    same for every folder whose safetensors header, file size and `layout_config` are equal."""

    offsets: list[int]
    """Of every matrix in pack order (`pack_matrices`)."""
    num_pages: int
    local_offsets: np.ndarray
    ranks: np.ndarray
    max_rank: int
    target_modules: tuple[str, ...]
    copies: _Copies | None
    """None where the pages are filled module by module (`AdapterReader._pack`)."""


class _LayoutCache:
    """The layouts of the last MAX_CACHED_LAYOUTS distinct (header, size, config) keys read,
    shared by the loader threads; a layout is stored only once its folder passed every check."""

    def __init__(self) -> None:
        self._layouts: dict[tuple[bytes, int, str], _Layout] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[bytes, int, str]) -> _Layout | None:
        return self._layouts.get(key)

    def put(self, key: tuple[bytes, int, str], layout: _Layout) -> None:
        with self._lock:
            if len(self._layouts) >= MAX_CACHED_LAYOUTS:
                del self._layouts[next(iter(self._layouts))]  # the oldest
            self._layouts[key] = layout


def pack_matrices(sizes: Sequence[int], page_numel: int) -> tuple[list[int], int]:
    """Greedy placement of matrices of `sizes` elements: (offset of each from the first page, pages used)."""
    offsets: list[int] = []
    page, cursor = 0, 0
    for numel in sizes:
        assert numel <= page_numel, f"a {numel}-element matrix cannot fit a {page_numel} page"
        start = round_up(cursor, MATRIX_ALIGNMENT)
        if start + numel > page_numel:
            page, start = page + 1, 0
        offsets.append(page * page_numel + start)
        cursor = start + numel
    return offsets, page + 1 if sizes else 0


def weights_digest(*tensors: torch.Tensor) -> bytes:
    """SHA-256 of the tensors' bytes, in order."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.digest()


def check_adapter_name(name: str) -> None:
    """AdapterError for a name loraserve cannot serve under."""
    if not is_servable_name(name):
        raise AdapterError(f"adapter name {name!r} must be non-empty, without whitespace or ','")


class AdapterReader:
    """Reads PEFT folders into `HostAdapter`s for one model and pool geometry."""

    def __init__(
        self,
        arch: ModelArch,
        geometry: PoolGeometry,
        max_lora_rank: int,
        dtype: torch.dtype,
        pin_memory: bool = False,
        max_weight: float = MAX_FOLDED_MAGNITUDE,
        base_weights: BaseWeights | None = None,
        shards: int = 1,
    ) -> None:
        """`max_weight`: the largest entry of A or scaled B accepted (`max_adapter_weight`).
        `base_weights`: the model's linear weights (whole, under tensor parallelism too),
        which DoRA's g is computed from; None (a reader without a model) refuses DoRA
        folders. `shards`: the tensor-parallel ranks, each of which gets its shard of every
        adapter (models/tensor_parallel.py); `geometry` is then a rank's."""
        self.rank_arch = shard_arch(arch, shards)
        """The architecture of one rank's shard (`arch` itself on one device)."""
        assert geometry.page_numel >= max_lora_rank * self.rank_arch.max_module_dim(), (
            f"page of {geometry.page_numel} elements cannot hold a rank-{max_lora_rank} matrix"
        )
        self.shards = [Shard(rank, shards) for rank in range(shards)]
        self.arch = arch
        self.geometry = geometry
        self.max_lora_rank = max_lora_rank
        self.dtype = dtype
        self.pin_memory = pin_memory
        self.max_weight = max_weight
        self.base_weights = base_weights
        self._layouts = _LayoutCache()

    def read(self, name: str, path: str | Path) -> HostAdapter:
        """Load and check a PEFT LoRA folder; AdapterError if refused."""
        check_adapter_name(name)
        folder = Path(path)
        config = read_config(folder)
        check_features(config, folder)
        fields = layout_config(config)
        try:
            file: SafetensorsFile | None = SafetensorsFile.open(folder / SAFETENSORS_FILE)
        except (SafetensorsFormatError, OSError):
            file = None  # refused by the checks below, in their order
        key = None if file is None else (file.header_bytes, file.data_size, json.dumps(fields))
        layout = self._layouts.get(key) if key is not None else None
        if layout is not None and file is not None:
            return self._pack_planned(name, folder, fields, file, layout)
        modules = check_peft_lora(
            folder, fields, lambda: load_tensors(folder, file), self.arch, self.max_lora_rank
        )
        layout = self._layout(modules, file)
        if key is not None and layout.copies is not None:
            self._layouts.put(key, layout)
            assert file is not None
            return self._pack_planned(name, folder, fields, file, layout)
        return self._pack(name, folder, modules, layout)

    @functools.cached_property
    def max_num_pages(self) -> int:
        """Pages of the largest adapter this reader accepts (every module at max_lora_rank):
        what a request must leave room for before its adapter is read; DoRA's g included."""
        dims = self.rank_arch.module_dims
        sizes = [
            size
            for _ in range(self.arch.num_layers)
            for module in LORA_MODULES
            for size in (
                self.max_lora_rank * dims(module)[0],  # A
                self.max_lora_rank * dims(module)[1],  # B
                dims(module)[1],  # g
            )
        ]
        return pack_matrices(sizes, self.geometry.page_numel)[1]

    def _layout(self, modules: list[LoraModule], file: SafetensorsFile | None) -> _Layout:
        """Where `modules`' matrices go in the pages (per module its A, then one B per slot
        it fills: one, or a fused module's parts; then for DoRA one g per slot), and, when
        every copy can be one `_foreach` op (`_Layout.copies`), the copies."""
        widths = [self._part_widths(module) for module in modules]
        sizes = [
            size
            for module, parts in zip(modules, widths, strict=True)
            for size in (
                module.rank * self.rank_arch.module_dims(module.name)[0],  # A
                *(module.rank * width for width in parts),
                *(parts if module.magnitude is not None else ()),
            )
        ]
        offsets, num_pages = pack_matrices(sizes, self.geometry.page_numel)
        shape = (self.arch.num_layers, NUM_LORA_MODULES)
        local_offsets = np.full((*shape, 3), NOT_TARGETED, dtype=np.int64)
        ranks = np.zeros(shape, dtype=np.int32)
        next_offset = iter(offsets)
        for module in modules:
            a_offset = next(next_offset)
            for slot in module.slots:
                local_offsets[module.layer, slot, :2] = a_offset, next(next_offset)
                ranks[module.layer, slot] = module.rank
            if module.magnitude is not None:
                for slot in module.slots:
                    local_offsets[module.layer, slot, 2] = next(next_offset)
        targeted = {module.name for module in modules}
        return _Layout(
            offsets=offsets,
            num_pages=num_pages,
            local_offsets=local_offsets,
            ranks=ranks,
            max_rank=max(module.rank for module in modules),
            target_modules=tuple(m for m in self.arch.linear_modules if m in targeted),
            copies=self._planned_copies(modules, widths, offsets, file),
        )

    def _planned_copies(
        self,
        modules: list[LoraModule],
        widths: list[list[int]],
        offsets: list[int],
        file: SafetensorsFile | None,
    ) -> _Copies | None:
        """The copies of `_pack_planned`, or None where they would not give `_pack`'s values
        or are not written for: under tensor parallelism, for DoRA, for tensors not aligned
        in the file or in a dtype float32 does not hold (float64)."""
        if file is None or len(self.shards) > 1 or any(m.magnitude is not None for m in modules):
            return None
        entries = file.entries
        sources = [entries[name] for m in modules for name in (m.a_name, m.b_name)]
        if not all(file.is_aligned(entry) for entry in sources):
            return None
        if not all(entry.dtype in HELD_BY_FLOAT32 for entry in sources):
            return None
        a_copies, b_copies, scalings = [], [], []
        next_offset = iter(offsets)
        for module, parts in zip(modules, widths, strict=True):
            rank, a_entry, b_entry = module.rank, entries[module.a_name], entries[module.b_name]
            in_features = self.rank_arch.module_dims(module.name)[0]
            a_begin = a_entry.begin // a_entry.dtype.itemsize
            # A: [rank, in] from the file as it is; B: [out, rank] read transposed, one
            # [rank, width] slice per part (rows `row` on), its scaling applied in the pages.
            a_copies.append(
                _Copy(
                    a_entry.dtype, (rank, in_features), (in_features, 1), a_begin, next(next_offset)
                )
            )
            b_begin, row = b_entry.begin // b_entry.dtype.itemsize, 0
            for width in parts:
                source = (b_entry.dtype, (rank, width), (1, rank), b_begin + row * rank)
                b_copies.append(_Copy(*source, next(next_offset)))
                scalings.append(module.scaling)
                row += width
        numels = [math.prod(copy.shape) for copy in b_copies]
        return _Copies(
            tuple(a_copies + b_copies),
            len(a_copies),
            scalings[0] if len(set(scalings)) == 1 else scalings,
            frozenset(copy.dtype for copy in a_copies + b_copies),
            None if self.dtype == torch.float32 else tuple(itertools.accumulate(numels, initial=0)),
        )

    def _pack_planned(
        self,
        name: str,
        folder: Path,
        fields: dict[str, Any],
        file: SafetensorsFile,
        layout: _Layout,
    ) -> HostAdapter:
        """`_pack` with every A and B copied by one `_foreach_copy_` from the mapped file and
        every B scaled by one `_foreach_mul_`, in float32: the values of `_scaled_copy`."""
        copies = layout.copies
        assert copies is not None and len(self.shards) == 1
        pages = self._new_pages(layout.num_pages)
        flat = pages[0].view(-1)
        data = {dtype: file.data(dtype) for dtype in copies.dtypes}
        sources = [data[c.dtype].as_strided(c.shape, c.stride, c.source) for c in copies.copies]
        targets = [flat.as_strided(c.shape, (c.shape[1], 1), c.target) for c in copies.copies]
        num_a = copies.num_a
        if copies.staging is None:  # float32 pool: every file value is one, scaled in place
            torch._foreach_copy_(targets, sources)
            torch._foreach_mul_(targets[num_a:], copies.scalings)
        else:  # narrower pool: B scaled in float32 first, then rounded once
            staging = torch.empty(copies.staging[-1], dtype=torch.float32)
            scaled = [
                staging.as_strided(c.shape, (c.shape[1], 1), offset)
                for c, offset in zip(copies.copies[num_a:], copies.staging, strict=False)
            ]
            torch._foreach_copy_(scaled, sources[num_a:])
            torch._foreach_mul_(scaled, copies.scalings)
            torch._foreach_copy_(targets, sources[:num_a] + scaled)
        if not self._values_fit(flat):  # find the culprit as `_pack` does
            modules = check_peft_lora(
                folder, fields, lambda: load_tensors(folder, file), self.arch, self.max_lora_rank
            )
            self._check_values(folder, modules, flat, layout.offsets)
        return self._host_adapter(name, folder, pages, layout)

    def _new_pages(self, num_pages: int) -> torch.Tensor:
        return torch.zeros(  # [shards, num_pages, page_numel]
            len(self.shards),
            num_pages,
            self.geometry.page_numel,
            dtype=self.dtype,
            pin_memory=self.pin_memory,
        )

    def _host_adapter(
        self, name: str, folder: Path, pages: torch.Tensor, layout: _Layout
    ) -> HostAdapter:
        offsets_tensor = torch.from_numpy(layout.local_offsets.copy())
        ranks_tensor = torch.from_numpy(layout.ranks.copy())
        return HostAdapter(
            name=name,
            path=str(folder),
            pages=pages,
            local_offsets=offsets_tensor,
            ranks=ranks_tensor,
            max_rank=layout.max_rank,
            target_modules=layout.target_modules,
            digest=weights_digest(pages, offsets_tensor, ranks_tensor),
        )

    def _pack(
        self, name: str, folder: Path, modules: list[LoraModule], layout: _Layout
    ) -> HostAdapter:
        """Copy every module's matrices from the mapped file into page-sized slabs, in the
        pool's dtype and layout (one copy each, the scaling folded into B as it is copied),
        where `layout` places them; then check the slabs' values in one pass. Under tensor
        parallelism each rank's slabs hold its shard of every matrix, in the same places."""
        scales = {  # DoRA's g, [out] in the pool dtype, from the whole module
            index: self._magnitude_scale(folder, module)
            for index, module in enumerate(modules)
            if module.magnitude is not None
        }
        pages = self._new_pages(layout.num_pages)
        for shard in self.shards:
            flat = pages[shard.rank].view(-1)
            next_offset = iter(layout.offsets)
            for index, module in enumerate(modules):
                rank, a_offset = module.rank, next(next_offset)
                lora_a = shard_linear(self.arch, module.name, module.lora_a, shard, "in")
                lora_b = shard_linear(self.arch, module.name, module.lora_b, shard, "out")
                flat[a_offset : a_offset + lora_a.numel()].view(lora_a.shape).copy_(lora_a)
                row = 0
                parts = self._part_widths(module)
                for width in parts:  # parts share one A
                    b_offset = next(next_offset)
                    target = flat[b_offset : b_offset + rank * width].view(rank, width)
                    _scaled_copy(target, lora_b[row : row + width].T, module.scaling)
                    row += width
                if index in scales:
                    scale = shard_linear(self.arch, module.name, scales[index], shard, "out")
                    for part in scale.split(parts):
                        g_offset = next(next_offset)
                        flat[g_offset : g_offset + part.numel()].copy_(part)
            if not self._values_fit(flat):
                self._check_values(folder, modules, flat, layout.offsets)
        return self._host_adapter(name, folder, pages, layout)

    def _magnitude_scale(self, folder: Path, module: LoraModule) -> torch.Tensor:
        """DoRA's g of a module, [out_features] in the pool dtype (memory/dora.py)."""
        if self.base_weights is None:
            raise refuse(folder, "DoRA (use_dora) needs the base model's weights to serve")
        scale = magnitude_scale(module, self.base_weights, folder).to(self.dtype)
        if not torch.isfinite(scale).all():
            raise refuse(
                folder, f"DoRA magnitude {module.magnitude_name} overflows {self.dtype} as m / norm"
            )
        return scale

    def _part_widths(self, module: LoraModule) -> list[int]:
        """Output widths of the slots `module` fills (one, or a fused module's parts)."""
        return [self.rank_arch.module_dims(LORA_MODULES[slot])[1] for slot in module.slots]

    def _values_fit(self, flat: torch.Tensor) -> bool:
        """Whether every value of the slabs is finite and within `max_weight`: one pass."""
        smallest, largest = torch.aminmax(flat)  # NaN if any is NaN
        return -float(smallest) <= self.max_weight and float(largest) <= self.max_weight

    def _check_values(
        self, folder: Path, modules: list[LoraModule], flat: torch.Tensor, offsets: list[int]
    ) -> None:
        """Refuse the adapter whose slabs `_values_fit` did not accept, once in the pool's
        dtype, naming the culprit: the first found in the order the file's modules come
        (its values first, then the converted ones)."""
        for module in modules:
            for tensor_name, tensor in (
                (module.a_name, module.lora_a),
                (module.b_name, module.lora_b),
            ):
                if not torch.isfinite(tensor).all():
                    raise refuse(folder, f"tensor {tensor_name} contains NaN or inf")
        next_offset = iter(offsets)
        for module in modules:
            a_offset = next(next_offset)
            b_offsets = [next(next_offset) for _ in module.slots]
            if module.magnitude is not None:  # g: checked finite as it was computed
                for _ in module.slots:
                    next(next_offset)
            a_numel = module.rank * self.rank_arch.module_dims(module.name)[0]
            matrices = [(module.a_name, flat[a_offset : a_offset + a_numel])]
            matrices += [
                (module.b_name, flat[b : b + module.rank * width])
                for b, width in zip(b_offsets, self._part_widths(module), strict=True)
            ]
            for tensor_name, matrix in matrices:
                self._check_matrix(folder, module, tensor_name, matrix)
        raise AssertionError("a value past the limit was not found in any matrix")

    def _check_matrix(
        self, folder: Path, module: LoraModule, tensor_name: str, matrix: torch.Tensor
    ) -> None:
        if not torch.isfinite(matrix).all():
            raise refuse(folder, f"tensor {tensor_name} overflows {self.dtype} once scaled")
        largest = float(matrix.abs().max())
        if largest > self.max_weight:
            raise refuse(
                folder,
                f"tensor {tensor_name} has entries of magnitude {largest:.3g} once scaled "
                f"(scaling {module.scaling:.3g}); past max_adapter_weight "
                f"{self.max_weight:g}, which no trained adapter comes near",
            )


def _scaled_copy(target: torch.Tensor, source: torch.Tensor, scaling: float) -> None:
    """target = scaling * source, multiplied in float32 and rounded once to target's dtype
    (as converting the file's tensor to float32, scaling, then to the pool's dtype would)."""
    if source.dtype == torch.float32:
        torch.mul(source, scaling, out=target)
    elif target.dtype == torch.float32:
        target.copy_(source).mul_(scaling)  # exact: a float32 holds any narrower float
    else:
        torch.mul(source.float(), scaling, out=target)
