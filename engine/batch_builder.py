"""Turns the scheduler's chunks into one `ForwardBatch` (flat tokens, grouped by adapter)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from loraserve.kernels.constants import NO_ADAPTER
from loraserve.models.batch import ForwardBatch, LoraBatch
from loraserve.scheduler.request import SequenceState


class Chunk(Protocol):
    """One scheduled run of a sequence's tokens (the scheduler's ScheduledChunk)."""

    seq: SequenceState
    num_tokens: int

    @property
    def samples(self) -> bool: ...


class AdapterTables(Protocol):
    """What the batch needs of the memory manager."""

    pool: torch.Tensor
    lora_offsets: torch.Tensor
    lora_ranks: torch.Tensor

    @property
    def block_size(self) -> int: ...

    def slot_of(self, adapter: str | None) -> int: ...

    def max_rank_of(self, adapter: str | None) -> int: ...


def order_by_adapter(chunks: Sequence[Chunk], memory: AdapterTables) -> list[Chunk]:
    """Chunks of one adapter next to each other, so each adapter is one SGMV segment."""
    return sorted(chunks, key=lambda chunk: memory.slot_of(chunk.seq.adapter))


def build_batch(
    chunks: Sequence[Chunk], memory: AdapterTables, device: torch.device
) -> ForwardBatch:
    """The forward batch of `chunks`, taken in the given order (see models/batch.py)."""
    block_size = memory.block_size
    input_ids: list[int] = []
    slot_mapping: list[int] = []
    positions: list[int] = []
    query_starts, context_lens, logits_indices = [0], [], []
    segment_starts: list[int] = [0]
    segment_slots: list[int] = []
    for chunk in chunks:
        seq = chunk.seq
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + chunk.num_tokens
        input_ids += seq.token_ids[start:end]
        positions += range(start, end)
        table = seq.block_table
        slot_mapping += [
            table[p // block_size] * block_size + p % block_size for p in range(start, end)
        ]
        query_starts.append(query_starts[-1] + chunk.num_tokens)
        context_lens.append(end)
        if chunk.samples:
            logits_indices.append(query_starts[-1] - 1)
        slot = memory.slot_of(seq.adapter)
        if segment_slots and segment_slots[-1] == slot:
            segment_starts[-1] = query_starts[-1]
        else:
            segment_slots.append(slot)
            segment_starts.append(query_starts[-1])
    max_blocks = max(len(chunk.seq.block_table) for chunk in chunks)
    tables = [
        chunk.seq.block_table + [0] * (max_blocks - len(chunk.seq.block_table)) for chunk in chunks
    ]

    def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    lora = None
    if any(slot != NO_ADAPTER for slot in segment_slots):
        max_rank = max(memory.max_rank_of(chunk.seq.adapter) for chunk in chunks)
        lora = LoraBatch(
            tensor(segment_starts, torch.int32),
            tensor(segment_slots, torch.int32),
            memory.pool,
            memory.lora_offsets,
            memory.lora_ranks,
            max_rank,
        )
    return ForwardBatch(
        input_ids=tensor(input_ids, torch.int64),
        positions=tensor(positions, torch.int64),
        query_starts=tensor(query_starts, torch.int32),
        context_lens=tensor(context_lens, torch.int32),
        block_tables=tensor(tables, torch.int32),
        slot_mapping=tensor(slot_mapping, torch.int64),
        logits_indices=tensor(logits_indices, torch.int64),
        lora=lora,
    )
