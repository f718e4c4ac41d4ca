"""The step's batch metadata: the worked example of engine/runner/batch_metadata.py, buffers that keep
their addresses from step to step, and padding to a CUDA-graph bucket."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from graph_harness import batch_tensors
from torch.utils._python_dispatch import TorchDispatchMode

from loraserve.engine.runner.batch_metadata import BatchMetadata
from loraserve.kernels.constants import NO_ADAPTER
from loraserve.scheduler.request import SequenceState
from loraserve.scheduler.scheduler import ScheduledChunk

Chunk = ScheduledChunk  # (seq, num_tokens, slot), as the scheduler makes them


@dataclass
class Adapters:
    slot_max_rank: list[int] = field(default_factory=lambda: [8, 0, 0])


def seq(name: str, num_tokens: int, computed: int, pages: list[int]) -> SequenceState:
    state = SequenceState(name, None, [100 * (ord(name) - 64) + i for i in range(num_tokens)])
    state.num_computed_tokens = computed
    state.block_table = pages
    return state


def example() -> list[Chunk]:
    """The module docstring's example: block size 4, chunks A (base, decode), B (slot 0,
    3-token prompt), C (slot 0, decode)."""
    return [
        Chunk(seq("A", 6, 5, [7, 2]), 1, NO_ADAPTER),
        Chunk(seq("B", 3, 0, [5]), 3, 0),
        Chunk(seq("C", 9, 8, [1, 4, 6]), 1, 0),
    ]


def builder(packed: bool = False, tile_map: bool = True) -> BatchMetadata:
    """On a CPU; `packed`: through the packed upload that CUDA uses; `tile_map`: for
    kernels that read the LoRA tile map (Triton's)."""
    return BatchMetadata(
        max_num_tokens=32,
        max_num_seqs=8,
        max_blocks_per_seq=6,
        block_size=4,
        max_lora_rank=16,
        device=torch.device("cpu"),
        packed=packed,
        tile_map=tile_map,
    )


@pytest.mark.parametrize("packed", [False, True], ids=["host", "packed"])
def test_the_worked_example(packed: bool) -> None:
    batch = builder(packed).build(example(), Adapters())
    assert batch.input_ids.tolist() == [105, 200, 201, 202, 308]
    assert batch.positions.tolist() == [5, 0, 1, 2, 8]
    assert batch.query_starts.tolist() == [0, 1, 4, 5]
    assert batch.context_lens.tolist() == [6, 3, 9]
    assert batch.block_tables.tolist() == [[7, 2, 0], [5, 0, 0], [1, 4, 6]]
    assert batch.slot_mapping.tolist() == [2 * 4 + 1, 5 * 4, 5 * 4 + 1, 5 * 4 + 2, 6 * 4]
    assert batch.logits_indices.tolist() == [0, 3, 4]
    assert batch.lora is not None
    assert batch.lora.segment_starts.tolist() == [0, 1, 5]
    assert batch.lora.segment_slots.tolist() == [NO_ADAPTER, 0]
    assert batch.lora.max_rank == 8
    assert batch.max_context_len is not None and batch.max_context_len.tolist() == [9]


def test_buffers_keep_their_addresses_and_stale_rows_are_overwritten() -> None:
    metadata = builder()
    first = metadata.build(example(), Adapters())
    chunks = [Chunk(seq("D", 4, 0, [3]), 2, NO_ADAPTER)]  # a chunked prefill: no logits
    second = metadata.build(chunks, Adapters())
    assert second.input_ids.data_ptr() == first.input_ids.data_ptr()
    assert second.block_tables.data_ptr() == first.block_tables.data_ptr()
    assert second.input_ids.tolist() == [400, 401]
    assert second.block_tables.tolist() == [[3]]
    assert second.logits_indices.tolist() == []
    assert second.lora is None  # no adapter in the batch: LoRA is skipped


@pytest.mark.parametrize("packed", [False, True], ids=["host", "packed"])
def test_a_decode_batch_padded_to_its_bucket(packed: bool) -> None:
    chunks = [Chunk(seq("A", 6, 5, [7, 2]), 1, NO_ADAPTER), Chunk(seq("C", 9, 8, [1, 4, 6]), 1, 0)]
    batch = builder(packed).build(chunks, Adapters(), pad_to=4)
    assert batch.input_ids.shape == (4,) and batch.block_tables.shape == (4, 6)
    assert batch.slot_mapping.tolist()[2:] == [-1, -1]  # padding writes no KV
    assert batch.context_lens.tolist() == [6, 9, 1, 1]
    assert batch.query_starts.tolist() == [0, 1, 2, 3, 4]
    assert batch.logits_indices.tolist() == [0, 1, 2, 3]
    assert batch.lora is not None and batch.lora.max_rank == 16  # the graph's largest rank
    # The real tokens keep their segments; one NO_ADAPTER segment takes the padding.
    assert batch.lora.segment_starts.tolist() == [0, 1, 2, 4, 4]
    assert batch.lora.segment_slots.tolist() == [NO_ADAPTER, 0, NO_ADAPTER, NO_ADAPTER]


def test_a_padded_batch_without_adapters_has_no_lora_unless_asked() -> None:
    """The graph set without adapters makes no LoRA launch: its batches carry no LoraBatch;
    `with_lora` gives one anyway (capturing the other set) at the graph's largest rank."""
    chunks = [Chunk(seq("A", 6, 5, [7, 2]), 1, NO_ADAPTER)]
    metadata = builder()
    assert metadata.build(chunks, Adapters(), pad_to=4).lora is None
    forced = metadata.build([], Adapters(), pad_to=4, with_lora=True).lora
    assert forced is not None and forced.max_rank == 16
    assert forced.segment_slots.tolist() == [NO_ADAPTER] * 4


class CountCopies(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.copies += func.overloadpacket is torch.ops.aten.copy_
        return func(*args, **(kwargs or {}))


def test_a_packed_step_is_one_upload_and_one_table_spread_at_its_buckets_addresses() -> None:
    """Packed (as on CUDA): one copy of every small array, one spreading the block table's
    used columns into the static table; two batches padded to one bucket, of other sizes
    and table widths, see the same addresses and shapes (a graph's inputs)."""
    metadata = builder(packed=True)
    wide = [Chunk(seq("C", 9, 8, [1, 4, 6]), 1, 0), Chunk(seq("A", 6, 5, [7, 2]), 1, 0)]
    with CountCopies() as counter:
        first = metadata.build(wide, Adapters(), pad_to=4)
    assert counter.copies == 2
    narrow = [Chunk(seq("E", 2, 1, [3]), 1, 0)]
    second = metadata.build(narrow, Adapters(), pad_to=4)
    for name, tensor in batch_tensors(first).items():
        other = batch_tensors(second)[name]
        assert (tensor.data_ptr(), tensor.shape) == (other.data_ptr(), other.shape), name
    assert second.block_tables[0, 0] == 3 and second.context_lens.tolist() == [2, 1, 1, 1]
    assert second.max_context_len is not None and second.max_context_len.tolist() == [2]
