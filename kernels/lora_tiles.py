"""The tile map of a step's LoRA launches: which tokens each program of lora_shrink/expand owns.

A tile is up to `tile_tokens` consecutive tokens of ONE segment, so one program reads its
adapter's A (or a column block of B) once for all of them. The map is built on the host
with the batch (engine/runner/batch_metadata.py, into a static buffer) and read on the
device: each row is `(slot, first token, end token)`, so a program finds its work with
one load, no search over the segments and no chain of dependent lookups.

Worked example, tile_tokens = 4, segment_starts [0, 3, 13, 18, 20], slots [-1, 0, 2, 1]:

    segment  slot  tokens   tiles
    0        -1    0..2     (-1, 0, 3)
    1         0    3..12    (0, 3, 7) (0, 7, 11) (0, 11, 13)
    2         2    13..17   (2, 13, 17) (2, 17, 18)
    3         1    18..19   (1, 18, 20)
    -> 7 tiles. A NO_ADAPTER tile's programs only store the zeros lora_shrink returns there.

Tile sizes (each a separate Triton specialisation, so there are three):
- `DECODE_TILE_TOKENS` (1) when every sequence of the step brings one token: the
  kernels then run BGMV-style (a matrix-vector product per token, rank cut into narrow
  blocks for more programs). Every CUDA-graph batch is one, so a captured graph and the
  same batch run eagerly take the same path and give the same bits, and a token's
  result never depends on its neighbours or on the padding.
- 16 or 64 (`SGMV_TILE_TOKENS`) otherwise: tiles multiply through `tl.dot`, 16 when
  segments are short (the dot's minimum), 64 for prefill chunks.

Under a CUDA graph the launch grid is `max_tiles`, the bucket's bound, and programs past
`num_tiles` (a device scalar) return at once: the grid is fixed, the work is the batch's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from loraserve.kernels.ops import Segments

DECODE_TILE_TOKENS = 1
SGMV_TILE_TOKENS = (16, 64)
TILE_COLUMNS = 3  # slot, first token, end token


@dataclass(frozen=True)
class LoraTiles:
    """A step's tile map, as the LoRA kernels read it."""

    table: torch.Tensor
    """[>= max_tiles, 3] int32 rows (slot, first token, end token); rows past num_tiles unread."""
    num_tiles: torch.Tensor
    """[1] int32 on the kernels' device: the tiles that hold tokens."""
    max_tiles: int
    """The launch grid along tiles: num_tiles eagerly, the bucket's bound under a CUDA graph."""
    tile_tokens: int
    """Tokens per tile (a constexpr of the kernels): DECODE_TILE_TOKENS, 16 or 64."""


def choose_tile_tokens(num_tokens: int, num_segments: int, decode: bool) -> int:
    """Tokens per tile: 1 for a decode step, else 16 for short segments, 64 for prefill."""
    if decode:
        return DECODE_TILE_TOKENS
    small, large = SGMV_TILE_TOKENS
    return small if num_tokens <= small * num_segments else large


def tile_bound(num_tokens: int, num_segments: int, tile_tokens: int) -> int:
    """The most tiles any split of `num_tokens` into `num_segments` segments needs."""
    return min(num_tokens, num_tokens // tile_tokens + num_segments)


def fill_tile_map(
    segment_starts: np.ndarray, segment_slots: np.ndarray, tile_tokens: int, table: np.ndarray
) -> int:
    """Write the tiles of the segments into `table` (`[>= bound, 3]`); returns their count.

    segment_starts: [num_segments + 1] token boundaries; segment_slots: [num_segments].
    The module docstring walks through an example."""
    lengths = np.diff(segment_starts).astype(np.int64)  # [num_segments]
    tiles_per_segment = (lengths + tile_tokens - 1) // tile_tokens  # 0 for an empty segment
    num_tiles = int(tiles_per_segment.sum())
    segment_of_tile = np.repeat(np.arange(len(lengths)), tiles_per_segment)  # [num_tiles]
    first_tile = np.cumsum(tiles_per_segment) - tiles_per_segment  # [num_segments]
    index_in_segment = np.arange(num_tiles) - first_tile[segment_of_tile]
    first = segment_starts[segment_of_tile] + index_in_segment * tile_tokens
    table[:num_tiles, 0] = segment_slots[segment_of_tile]
    table[:num_tiles, 1] = first
    table[:num_tiles, 2] = np.minimum(first + tile_tokens, segment_starts[segment_of_tile + 1])
    return num_tiles


def tiles_of(
    segment_starts: torch.Tensor, segment_slots: torch.Tensor, decode: bool | None = None
) -> LoraTiles:
    """The tile map of segments that come without one (tests, benchmarks): built on the host,
    so on CUDA this reads the segments back (a synchronisation; never inside a graph).
    `decode` (1-token tiles): as given, else when every segment holds one token."""
    starts = segment_starts.cpu().numpy()
    slots = segment_slots.cpu().numpy()
    num_tokens, num_segments = int(starts[-1]), len(slots)
    if decode is None:
        decode = num_tokens == num_segments
    tile_tokens = choose_tile_tokens(num_tokens, num_segments, decode)
    table = np.zeros((max(1, tile_bound(num_tokens, num_segments, tile_tokens)), 3), np.int32)
    num_tiles = fill_tile_map(starts, slots, tile_tokens, table)
    device = segment_starts.device
    return LoraTiles(
        torch.from_numpy(table).to(device),
        torch.tensor([num_tiles], dtype=torch.int32, device=device),
        num_tiles,
        tile_tokens,
    )


def tiles_for(segments: Segments) -> LoraTiles:
    """The tile map a step's segments carry (models.batch.LoraBatch from the runner's
    metadata), else one built from them here."""
    tiles = getattr(segments, "tiles", None)
    if isinstance(tiles, LoraTiles):
        return tiles
    return tiles_of(segments.segment_starts, segments.segment_slots)
