"""The LoRA tile map the batch metadata builds (kernels/lora_tiles.py) beside the segments:
tiles of the worked example, 1-token tiles for decode, the bucket's grid for a padded
(CUDA-graph) batch, and static buffers. Kept apart from test_batch_metadata.py, whose
helpers it reuses."""

from __future__ import annotations

from test_batch_metadata import Adapters, Chunk, builder, example, seq

from loraserve.kernels.constants import NO_ADAPTER
from loraserve.kernels.lora_tiles import DECODE_TILE_TOKENS


def test_the_worked_example_has_one_16_token_tile_per_segment() -> None:
    batch = builder().build(example(), Adapters())
    assert batch.lora is not None and batch.lora.tiles is not None
    tiles = batch.lora.tiles
    assert tiles.tile_tokens == 16  # a prompt chunk is in the step: SGMV tiles
    assert tiles.max_tiles == 2 and tiles.num_tiles.tolist() == [2]
    assert tiles.table.tolist() == [[NO_ADAPTER, 0, 1], [0, 1, 5]]


def test_a_padded_decode_batch_launches_the_buckets_tiles() -> None:
    chunks = [Chunk(seq("A", 6, 5, [7, 2]), 1, NO_ADAPTER), Chunk(seq("C", 9, 8, [1, 4, 6]), 1, 0)]
    metadata = builder()
    eager = metadata.build(chunks, Adapters())
    assert eager.lora is not None and eager.lora.tiles is not None
    assert eager.lora.tiles.tile_tokens == DECODE_TILE_TOKENS and eager.lora.tiles.max_tiles == 2
    padded = metadata.build(chunks, Adapters(), pad_to=4)
    assert padded.lora is not None and padded.lora.tiles is not None
    tiles = padded.lora.tiles
    assert tiles.tile_tokens == DECODE_TILE_TOKENS  # the same path as eagerly: the same bits
    assert tiles.max_tiles == 4  # the bucket's bound: the captured grid fits every batch
    assert tiles.num_tiles.tolist() == [4]
    assert tiles.table[:4].tolist() == [
        [NO_ADAPTER, 0, 1],
        [0, 1, 2],
        [NO_ADAPTER, 2, 3],
        [NO_ADAPTER, 3, 4],
    ]
    assert tiles.table.data_ptr() == eager.lora.tiles.table.data_ptr()  # a static buffer
    assert tiles.num_tiles.data_ptr() == eager.lora.tiles.num_tiles.data_ptr()


def test_kernels_that_read_no_tile_map_get_none_built() -> None:
    """The native and torch kernels read the segments alone: their steps skip the map."""
    batch = builder(tile_map=False).build(example(), Adapters())
    assert batch.lora is not None and batch.lora.tiles is None
    assert batch.lora.segment_slots.tolist() == [NO_ADAPTER, 0]
