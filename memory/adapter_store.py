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

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from loraserve.errors import AdapterError
from loraserve.memory.adapter_dir import is_servable_name
from loraserve.memory.dora import BaseWeights, magnitude_scale
from loraserve.memory.geometry import MATRIX_ALIGNMENT, PoolGeometry, round_up
from loraserve.memory.peft_config import refuse
from loraserve.memory.peft_format import LoraModule, read_peft_lora
from loraserve.models.arch import LORA_MODULES, NUM_LORA_MODULES, ModelArch

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
    """[num_pages, page_numel], pool dtype, CPU (pinned when the store pins)."""
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

    @property
    def is_dora(self) -> bool:
        """Whether any module is DoRA (carries a magnitude scale g)."""
        return bool((self.local_offsets[..., 2] != NOT_TARGETED).any())

    @property
    def num_pages(self) -> int:
        """Pages the adapter takes in the pool."""
        return int(self.pages.shape[0])

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
    ) -> None:
        """`max_weight`: the largest entry of A or scaled B accepted (`max_adapter_weight`).
        `base_weights`: the model's linear weights, which DoRA's g is computed from; None
        (a reader without a model) refuses DoRA folders."""
        assert geometry.page_numel >= max_lora_rank * arch.max_module_dim(), (
            f"page of {geometry.page_numel} elements cannot hold a rank-{max_lora_rank} matrix"
        )
        self.arch = arch
        self.geometry = geometry
        self.max_lora_rank = max_lora_rank
        self.dtype = dtype
        self.pin_memory = pin_memory
        self.max_weight = max_weight
        self.base_weights = base_weights

    def read(self, name: str, path: str | Path) -> HostAdapter:
        """Load and check a PEFT LoRA folder; AdapterError if refused."""
        check_adapter_name(name)
        folder = Path(path)
        modules = read_peft_lora(folder, self.arch, self.max_lora_rank)
        return self._pack(name, folder, modules)

    @functools.cached_property
    def max_num_pages(self) -> int:
        """Pages of the largest adapter this reader accepts (every module at max_lora_rank):
        what a request must leave room for before its adapter is read; DoRA's g included."""
        sizes = [
            size
            for _ in range(self.arch.num_layers)
            for module in LORA_MODULES
            for size in (
                self.max_lora_rank * self.arch.module_dims(module)[0],  # A
                self.max_lora_rank * self.arch.module_dims(module)[1],  # B
                self.arch.module_dims(module)[1],  # g
            )
        ]
        return pack_matrices(sizes, self.geometry.page_numel)[1]

    def _pack(self, name: str, folder: Path, modules: list[LoraModule]) -> HostAdapter:
        """Convert every module's matrices to the pool layout and pack them into pages."""
        # Per module: its A, then one B per slot it fills (one, or a fused module's parts),
        # then for DoRA one g per slot.
        matrices = [matrix for module in modules for matrix in self._host_matrices(folder, module)]
        offsets, num_pages = pack_matrices([m.numel() for m in matrices], self.geometry.page_numel)
        pages = torch.zeros(  # [num_pages, page_numel]
            num_pages, self.geometry.page_numel, dtype=self.dtype, pin_memory=self.pin_memory
        )
        flat = pages.view(-1)
        for matrix, offset in zip(matrices, offsets, strict=True):
            flat[offset : offset + matrix.numel()] = matrix.reshape(-1)
        shape = (self.arch.num_layers, NUM_LORA_MODULES)
        local_offsets = torch.full((*shape, 3), NOT_TARGETED, dtype=torch.int64)
        ranks = torch.zeros(shape, dtype=torch.int32)
        next_offset = iter(offsets)
        for module in modules:
            a_offset = next(next_offset)
            for slot in module.slots:  # a fused module's parts share its one A
                local_offsets[module.layer, slot, :2] = torch.tensor([a_offset, next(next_offset)])
                ranks[module.layer, slot] = module.rank
            if module.magnitude is not None:
                for slot in module.slots:
                    local_offsets[module.layer, slot, 2] = next(next_offset)
        targeted = {module.name for module in modules}
        return HostAdapter(
            name=name,
            path=str(folder),
            pages=pages,
            local_offsets=local_offsets,
            ranks=ranks,
            max_rank=max(module.rank for module in modules),
            target_modules=tuple(m for m in self.arch.linear_modules if m in targeted),
            digest=weights_digest(pages, local_offsets, ranks),
        )

    def _host_matrices(self, folder: Path, module: LoraModule) -> list[torch.Tensor]:
        """A [r, in], then scaled, transposed B [r, out_i] of each slot, then (DoRA) g [1, out_i]
        of each slot, in the pool dtype."""
        lora_a = module.lora_a.to(self.dtype)  # [r, in]
        # Fold the scaling in float32, then round once to the pool dtype.
        lora_b = (module.lora_b * module.scaling).T.to(self.dtype)  # [r, out]
        for tensor_name, matrix in ((module.a_name, lora_a), (module.b_name, lora_b)):
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
        widths = [self.arch.module_dims(LORA_MODULES[slot])[1] for slot in module.slots]
        matrices = [lora_a, *(part.contiguous() for part in lora_b.split(widths, dim=1))]
        if module.magnitude is None:
            return matrices
        scale = self._magnitude_scale(folder, module)  # [1, out]
        return matrices + [part.contiguous() for part in scale.split(widths, dim=1)]

    def _magnitude_scale(self, folder: Path, module: LoraModule) -> torch.Tensor:
        """DoRA's g of a module, [1, out_features] in the pool dtype (memory/dora.py)."""
        if self.base_weights is None:
            raise refuse(folder, "DoRA (use_dora) needs the base model's weights to serve")
        scale = magnitude_scale(module, self.base_weights, folder).to(self.dtype)
        if not torch.isfinite(scale).all():
            raise refuse(
                folder, f"DoRA magnitude {module.magnitude_name} overflows {self.dtype} as m / norm"
            )
        return scale.view(1, -1)
