"""Where a read adapter's matrices go in its pages, and the few ops that put them there.

Thousands of adapters trained alike (one recipe, one base model) have byte-equal safetensors
headers and equal targeting configs: everything a read works out before it touches the
values (which tensors fill which modules, their shapes and checks, the offsets in the pages)
is the same for all of them. `AdapterReader` (memory/adapter_store.py) keeps it per
(header, file size, `peft_format.layout_config`) as a `Layout`, and fills the pages of the
next such folder with `copy_planned`: every A and B in one `torch._foreach_copy_` straight
from the file's bytes, every B scaled by one `_foreach_mul_`. Example, four q/k/v/o layers
at rank 8: 32 copies in 2 ops (3 for a half-precision pool) instead of 32 per-matrix copies
and their ~3,500 Python calls of per-tensor checks. Where the file and the pool are float32
and the engine runs the native kernels, one C call does them all (`kernels.native.pack_copies`:
no view per matrix, each transposed B walked along the file's rows).

The values are those of the module-by-module copy (`adapter_store._scaled_copy`): B is
scaled in float32, which holds every value of the float16/bfloat16/float32 files it applies
to, and rounded once into a narrower pool.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from loraserve.kernels import native
from loraserve.memory.peft_format import LoraModule
from loraserve.memory.safetensors_map import SafetensorsFile, TensorEntry
from loraserve.models.arch import ModelArch

HELD_BY_FLOAT32 = frozenset({torch.float32, torch.float16, torch.bfloat16})
"""File dtypes whose every value a float32 holds: copied into float32, nothing rounds."""
MAX_CACHED_LAYOUTS = 64
"""Layouts a reader keeps (`LayoutCache`): thousands of adapters trained alike share a few."""


@dataclass(frozen=True)
class Copy:
    """One matrix copied from the mapped file into the pages: `shape` elements read at
    `stride` from element `source` of the file's data (as `dtype`), written row-major from
    element `target` of the pages."""

    dtype: torch.dtype
    shape: tuple[int, int]
    stride: tuple[int, int]
    source: int
    target: int


@dataclass(frozen=True)
class Copies:
    """Every copy of an adapter: the A's, then the B's (transposed reads), and the scaling
    the B's get (one float when all share it, else one per B). A pool dtype narrower than
    float32 has the B's scaled in a float32 buffer, `staging[i]` the offset of B i in it
    (`staging[-1]` its size), then rounded once into the pages."""

    copies: tuple[Copy, ...]
    num_a: int
    scalings: float | list[float]
    dtypes: frozenset[torch.dtype]
    staging: tuple[int, ...] | None
    native: tuple[torch.Tensor, torch.Tensor] | None
    """The same copies for `kernels.native.pack_copies`, float32 file and pool only: [copies, 6]
    int64 (source, row stride, column stride, target, rows, columns), [copies] float32 scales
    (1 for an A)."""


@dataclass(frozen=True)
class Layout:
    """Where an adapter's matrices go (what `HostAdapter` records of it but its pages): the
    same for every folder whose safetensors header, file size and `layout_config` are equal."""

    offsets: list[int]
    """Of every matrix in pack order (`adapter_store.pack_matrices`)."""
    num_pages: int
    local_offsets: np.ndarray
    """`HostAdapter.local_offsets`, as numpy (each adapter gets its copy)."""
    ranks: np.ndarray
    max_rank: int
    target_modules: tuple[str, ...]
    copies: Copies | None
    """None where the pages are filled module by module (`AdapterReader._pack`)."""


class LayoutCache:
    """The layouts of the MAX_CACHED_LAYOUTS (header, size, config) keys used last, shared by
    the loader threads; the reader stores one once its folder passed every check but that of
    its values, which every read makes."""

    def __init__(self) -> None:
        self._layouts: OrderedDict[tuple[bytes, int, str], Layout] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[bytes, int, str]) -> Layout | None:
        with self._lock:
            layout = self._layouts.get(key)
            if layout is not None:
                self._layouts.move_to_end(key)  # a layout thousands of adapters share stays
            return layout

    def put(self, key: tuple[bytes, int, str], layout: Layout) -> None:
        with self._lock:
            self._layouts[key] = layout
            self._layouts.move_to_end(key)
            if len(self._layouts) > MAX_CACHED_LAYOUTS:
                self._layouts.popitem(last=False)  # the least recently used


def plan_copies(
    modules: list[LoraModule],
    widths: list[list[int]],
    offsets: list[int],
    file: SafetensorsFile,
    arch: ModelArch,
    pool_dtype: torch.dtype,
) -> Copies | None:
    """The copies of checked plain-LoRA `modules` (`widths`: each one's part widths, `offsets`:
    its matrices' in pack order) from `file` into a pool of `pool_dtype` with `arch`'s
    shapes; None for a file these copies are not written for (a tensor not aligned, or in a
    dtype float32 does not hold: float64)."""
    entries = file.entries
    sources = [entries[name] for m in modules for name in (m.a_name, m.b_name)]
    if not all(_in_data(file, entry) and entry.dtype in HELD_BY_FLOAT32 for entry in sources):
        return None
    a_copies, b_copies, scalings = [], [], []
    next_offset = iter(offsets)
    for module, parts in zip(modules, widths, strict=True):
        rank, a_entry, b_entry = module.rank, entries[module.a_name], entries[module.b_name]
        in_features = arch.module_dims(module.name)[0]
        # A: [rank, in] as the file holds it; B: [out, rank] read transposed, one
        # [rank, width] slice per part (from row `row` on).
        a_source = a_entry.begin // a_entry.dtype.itemsize
        a_shape = (rank, in_features)
        a_copies.append(Copy(a_entry.dtype, a_shape, (in_features, 1), a_source, next(next_offset)))
        b_source, row = b_entry.begin // b_entry.dtype.itemsize, 0
        for width in parts:
            source = b_source + row * rank
            b_copies.append(
                Copy(b_entry.dtype, (rank, width), (1, rank), source, next(next_offset))
            )
            scalings.append(module.scaling)
            row += width
    numels = [math.prod(copy.shape) for copy in b_copies]
    dtypes = frozenset(copy.dtype for copy in a_copies + b_copies)
    return Copies(
        copies=tuple(a_copies + b_copies),
        num_a=len(a_copies),
        scalings=scalings[0] if len(set(scalings)) == 1 else scalings,
        dtypes=dtypes,
        staging=None
        if pool_dtype == torch.float32
        else tuple(itertools.accumulate(numels, initial=0)),
        native=_native_table(a_copies + b_copies, [1.0] * len(a_copies) + scalings)
        if pool_dtype == torch.float32 and dtypes == {torch.float32}
        else None,
    )


def _native_table(copies: list[Copy], scales: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """`Copies.native` of `copies`."""
    rows = [(c.source, *c.stride, c.target, *c.shape) for c in copies]
    return torch.tensor(rows, dtype=torch.int64), torch.tensor(scales, dtype=torch.float32)


def _in_data(file: SafetensorsFile, entry: TensorEntry) -> bool:
    """Whether the entry is whole elements of `file.data(entry.dtype)` (as safetensors writes
    files: a header padded to 8 bytes, each tensor aligned)."""
    return file.data_start % entry.dtype.itemsize == 0 and file.is_aligned(entry)


def copy_planned(
    flat: torch.Tensor, file: SafetensorsFile, copies: Copies, native_copies: bool = False
) -> None:
    """Write `copies` from `file` into `flat` (the pages, [num_pages * page_numel], zeros);
    with `native_copies`, in C where the copies allow it (`Copies.native`)."""
    if native_copies and copies.native is not None:
        native.pack_copies(file.data(torch.float32), flat, *copies.native)
        return
    data = {dtype: file.data(dtype) for dtype in copies.dtypes}  # [elements], views of the file
    sources = [data[c.dtype].as_strided(c.shape, c.stride, c.source) for c in copies.copies]
    targets = [flat.as_strided(c.shape, (c.shape[1], 1), c.target) for c in copies.copies]
    num_a = copies.num_a
    if copies.staging is None:  # float32 pool: it holds every file value, B scaled in place
        torch._foreach_copy_(targets, sources)
        torch._foreach_mul_(targets[num_a:], copies.scalings)
        return
    staging = torch.empty(copies.staging[-1], dtype=torch.float32)
    scaled = [  # [rank, width] each
        staging.as_strided(c.shape, (c.shape[1], 1), offset)
        for c, offset in zip(copies.copies[num_a:], copies.staging, strict=False)
    ]
    torch._foreach_copy_(scaled, sources[num_a:])
    torch._foreach_mul_(scaled, copies.scalings)
    torch._foreach_copy_(targets, sources[:num_a] + scaled)  # B rounded once
