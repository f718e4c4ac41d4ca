"""The page geometry of the unified pool, fixed at start-up.

A page holds either one KV block (`block_size` tokens of K and V for every layer,
laid out `[num_layers, 2, block_size, num_kv_heads, head_dim]`) or a slab of
adapter matrices. Every adapter matrix is stored row-major as `[rank, dim]`
(A as PEFT writes it, `[r, in]`; B transposed with scaling folded in, `[r, out]`)
and never straddles two pages, so the page must hold the largest matrix at
`max_lora_rank`.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraserve.models.arch import ModelArch

MATRIX_ALIGNMENT = 64
"""Adapter matrices start at multiples of this many elements inside a page
(128 bytes in bf16: aligned vector loads in the kernels)."""


def round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


@dataclass(frozen=True)
class PoolGeometry:
    """Sizes of the pool's pages; derived from the model, the block size and the max rank."""

    page_numel: int
    """Elements per page."""
    block_size: int
    """Tokens per KV page."""
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def for_model(cls, arch: ModelArch, block_size: int, max_lora_rank: int) -> PoolGeometry:
        kv_numel = arch.num_layers * 2 * block_size * arch.num_kv_heads * arch.head_dim
        largest_matrix = max_lora_rank * arch.max_module_dim()
        page_numel = round_up(max(kv_numel, largest_matrix), MATRIX_ALIGNMENT)
        return cls(page_numel, block_size, arch.num_layers, arch.num_kv_heads, arch.head_dim)

    @property
    def kv_block_numel(self) -> int:
        """Elements of one KV block (the first part of a KV page)."""
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim

    def kv_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one KV page seen as a block: [layers, 2 (K, V), block_size, kv_heads, head_dim]."""
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)
