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

A read works out the layout of its folder's matrices from the safetensors header and the
config's targeting fields, and keeps it (memory/adapter_layout.py): the next folder with
the same header, file size and fields, as thousands of adapters trained alike have, skips
every per-tensor check and has its matrices copied in a few ops; only its values are
checked (`_values_fit`).

An adapter's identity (`HostAdapter.identity`, the seed of its KV blocks' names in the prefix
cache) names the weights its pages hold. Hashing the pages costs a read twice what the rest
of it does (SHA-256 runs at a tenth of a copy's rate), so a folder whose file has settled
is named by its file's version instead (`file_identity`): its device, inode, size and
modification and change times, with the config fields and the layout read. Any write to a
file changes its change time, which no one can set back; a write in the same clock tick as
the one before it may not, so a file changed in the last `SETTLED_SECONDS`, or while it was
read, is named by the SHA-256 of its pages as read, as git names a "racily clean" file by
its content.

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
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loraserve.errors import AdapterError
from loraserve.memory.adapter_dir import is_servable_name
from loraserve.memory.adapter_layout import Layout, LayoutCache, copy_planned, plan_copies
from loraserve.memory.dora import BaseWeights, magnitude_scale
from loraserve.memory.geometry import MATRIX_ALIGNMENT, PoolGeometry, round_up
from loraserve.memory.peft_config import SAFETENSORS_FILE, check_features, read_config, refuse
from loraserve.memory.peft_format import LoraModule, check_peft_lora, layout_config, load_tensors
from loraserve.memory.safetensors_map import ReadBuffers, SafetensorsFile, SafetensorsFormatError
from loraserve.models.arch import LORA_MODULES, NUM_LORA_MODULES, ModelArch
from loraserve.models.tensor_parallel import Shard, shard_arch, shard_linear

NOT_TARGETED = -1
"""`local_offsets` entry of a module the adapter does not adapt."""
MAX_FOLDED_MAGNITUDE = 1e4
"""Largest entry of A or of scaled B that an adapter may hold by default. PEFT starts A near
±1/sqrt(in_features) and B at zero, and trained adapters' scaled entries stay within ~10;
an adapter past this bound (`lora_alpha: 1e38`, weights of 60,000) is a corrupt or absurd
file whose output would be overflow or noise: it is refused, naming the tensor."""


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
    from the start of each shard's slab `pages[s]` (page index * page_numel + offset in
    page); NOT_TARGETED (-1) where the module is not adapted (A, B, g) or not DoRA (g)."""
    ranks: torch.Tensor
    """[num_layers, NUM_LORA_MODULES] int32; 0 where the module is not adapted."""
    max_rank: int
    target_modules: tuple[str, ...]
    """Names (the model's `linear_modules` order) of the modules adapted in at least one layer."""
    identity: bytes
    """Its name for prefix caching: the KV its requests compute depends on its weights, so
    other weights read under its name get another identity, and a read of the same file
    version the same one (`file_identity`, else `weights_digest`)."""

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


SETTLED_SECONDS = 2.0
"""How long ago a file must have last changed for its version (`file_identity`) to name the
weights read from it: longer than a clock tick of any local file system's timestamps, and
than the 2 s of the coarsest (FAT's)."""


def weights_digest(*tensors: torch.Tensor) -> bytes:
    """SHA-256 of the tensors' bytes, in order."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.digest()


def file_identity(
    opened: os.stat_result, after: os.stat_result, *parts: bytes, now_ns: int | None = None
) -> bytes | None:
    """SHA-256 of a file's version (`opened`: its status when it was opened; `after`: once
    what was read from it is in place) and `parts`; None if the file changed in between,
    or in the last SETTLED_SECONDS (before `now_ns`, default now): then only the bytes read
    name what was read."""
    version = tuple(
        (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
        for status in (opened, after)
    )
    now_ns = time.time_ns() if now_ns is None else now_ns
    last_change = max(after.st_mtime_ns, after.st_ctime_ns)
    if version[0] != version[1] or now_ns - last_change <= SETTLED_SECONDS * 1e9:
        return None
    digest = hashlib.sha256(b"loraserve adapter file %d %d %d %d %d" % version[0])
    for part in parts:
        digest.update(len(part).to_bytes(8, "little") + part)
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
        native_copies: bool = False,
    ) -> None:
        """`max_weight`: the largest entry of A or scaled B accepted (`max_adapter_weight`).
        `base_weights`: the model's linear weights (whole, under tensor parallelism too),
        which DoRA's g is computed from; None (a reader without a model) refuses DoRA
        folders. `shards`: the tensor-parallel ranks, each of which gets its shard of every
        adapter (models/tensor_parallel.py); `geometry` is then a rank's. `native_copies`:
        fill float32 pages from float32 files in C (kernels/native.py), where the engine
        runs the native kernels (whose library is then built)."""
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
        self.native_copies = native_copies
        self._layouts = LayoutCache()
        self._buffers = ReadBuffers()
        """Each loader thread's buffer its files are read into: what a read takes from its
        file is copied into the adapter's pages before it returns."""

    def read(self, name: str, path: str | Path) -> HostAdapter:
        """Load and check a PEFT LoRA folder; AdapterError if refused."""
        check_adapter_name(name)
        folder = Path(path)
        config = read_config(folder)
        check_features(config, folder)
        fields = layout_config(config)
        read_as = json.dumps(fields, sort_keys=True)  # in the layout's key and the identity
        try:
            file: SafetensorsFile | None = SafetensorsFile.open(
                folder / SAFETENSORS_FILE, self._buffers
            )
        except (SafetensorsFormatError, OSError):
            file = None  # refused by the checks below, in their order
        key = None
        if file is not None:
            key = (file.header_bytes, file.data_size, read_as)
            layout = self._layouts.get(key)
            if layout is not None:  # a folder like this one passed every check
                return self._pack_planned(name, folder, fields, file, layout, read_as)
        modules = check_peft_lora(
            folder, fields, lambda: load_tensors(folder, file), self.arch, self.max_lora_rank
        )
        layout = self._layout(modules, file)
        if layout.copies is None:
            return self._pack(name, folder, modules, layout, file, read_as)
        assert file is not None and key is not None, "copies are planned from a mapped file"
        self._layouts.put(key, layout)
        return self._pack_planned(name, folder, fields, file, layout, read_as)

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

    def _layout(self, modules: list[LoraModule], file: SafetensorsFile | None) -> Layout:
        """Where `modules`' matrices go in the pages (per module its A, then one B per slot
        it fills: one, or a fused module's parts; then for DoRA one g per slot), and the
        copies that fill them in a few ops, except under tensor parallelism and for DoRA
        (filled module by module, `_pack`)."""
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
        return Layout(
            offsets=offsets,
            num_pages=num_pages,
            local_offsets=local_offsets,
            ranks=ranks,
            max_rank=max(module.rank for module in modules),
            target_modules=tuple(m for m in self.arch.linear_modules if m in targeted),
            copies=None
            if file is None or len(self.shards) > 1 or any(m.magnitude is not None for m in modules)
            else plan_copies(modules, widths, offsets, file, self.rank_arch, self.dtype),
        )

    def _pack_planned(
        self,
        name: str,
        folder: Path,
        fields: dict[str, Any],
        file: SafetensorsFile,
        layout: Layout,
        read_as: str,
    ) -> HostAdapter:
        """`_pack` by `layout.copies` (memory/adapter_layout.py): the same values."""
        assert layout.copies is not None and len(self.shards) == 1
        pages = self._new_pages(layout.num_pages)
        flat = pages[0].view(-1)
        copy_planned(flat, file, layout.copies, self.native_copies)
        if not self._values_fit(flat):  # find the culprit as `_pack` does
            modules = check_peft_lora(
                folder, fields, lambda: load_tensors(folder, file), self.arch, self.max_lora_rank
            )
            self._check_values(folder, modules, flat, layout.offsets)
        return self._host_adapter(name, folder, pages, layout, file, read_as)

    def _new_pages(self, num_pages: int) -> torch.Tensor:
        return torch.zeros(  # [shards, num_pages, page_numel]
            len(self.shards),
            num_pages,
            self.geometry.page_numel,
            dtype=self.dtype,
            pin_memory=self.pin_memory,
        )

    def _host_adapter(
        self,
        name: str,
        folder: Path,
        pages: torch.Tensor,
        layout: Layout,
        file: SafetensorsFile | None,
        read_as: str | None,
    ) -> HostAdapter:
        """The adapter read from `file` (None: not known) into `pages` by `layout`, `read_as`
        its config's LAYOUT_FIELDS as JSON: named by the file's version if it has settled,
        else by its pages' digest."""
        offsets_tensor = torch.from_numpy(layout.local_offsets.copy())
        ranks_tensor = torch.from_numpy(layout.ranks.copy())
        identity = None
        if file is not None and read_as is not None:
            identity = self._file_identity(folder, file, read_as, layout)
        return HostAdapter(
            name=name,
            path=str(folder),
            pages=pages,
            local_offsets=offsets_tensor,
            ranks=ranks_tensor,
            max_rank=layout.max_rank,
            target_modules=layout.target_modules,
            identity=identity or weights_digest(pages, offsets_tensor, ranks_tensor),
        )

    @staticmethod
    def _file_identity(
        folder: Path, file: SafetensorsFile, read_as: str, layout: Layout
    ) -> bytes | None:
        """`file_identity` of `file`, read as `read_as` into `layout`; None if it changed."""
        try:
            after = os.stat(folder / SAFETENSORS_FILE)
        except OSError:  # gone since it was read: named by what was read
            return None
        offsets, ranks = layout.local_offsets.tobytes(), layout.ranks.tobytes()
        return file_identity(file.status, after, read_as.encode(), offsets, ranks)

    def _pack(
        self,
        name: str,
        folder: Path,
        modules: list[LoraModule],
        layout: Layout,
        file: SafetensorsFile | None = None,
        read_as: str | None = None,
    ) -> HostAdapter:
        """Copy every module's matrices from the mapped file into page-sized slabs, in the
        pool's dtype and layout (one copy each, the scaling folded into B as it is copied),
        where `layout` places them; then check the slabs' values in one pass. Under tensor
        parallelism each rank's slabs hold its shard of every matrix, in the same places.
        `file` (the modules' file) and `read_as` (its config's LAYOUT_FIELDS as JSON) name
        the adapter by its file's version; without them, by its pages' digest."""
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
        return self._host_adapter(name, folder, pages, layout, file, read_as)

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
