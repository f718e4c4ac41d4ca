"""A step's batch metadata, built once per step into buffers allocated once at start-up.

The scheduler's chunks (already grouped by adapter slot) become the flat tensors the
forward pass and its kernels read (models/batch.py). Every tensor is a view of a
buffer sized by the limits of the configuration, so its address never changes: a
captured CUDA graph can replay over them, and on a CPU no step allocates. The host
side is numpy over (pinned, on CUDA) torch memory; on CUDA each step copies the
used part of each host buffer to its device twin, on a CPU the two are one.

Worked example, block size 4, three chunks in slot order:

    chunk  adapter slot  seq tokens  computed  this step  block table
    A      NO_ADAPTER    6           5         1 (decode) [7, 2]
    B      0             3           0         3 (prompt) [5]
    C      0             9           8         1 (decode) [1, 4, 6]

    input_ids       [A5 | B0 B1 B2 | C8]
    positions       [5 | 0 1 2 | 8]
    query_starts    [0, 1, 4, 5]
    context_lens    [6, 3, 9]
    block_tables    [[7, 2, 0], [5, 0, 0], [1, 4, 6]]   (entries past a table never read)
    slot_mapping    [2*4+1 | 5*4+0, 5*4+1, 5*4+2 | 6*4+0]
    logits_indices  [0, 3, 4]                         (every chunk reaches its end)
                    + any `extra_logits` after them   (prompt logprobs: engine/sampling/prompt_logprobs.py)
    segment_starts  [0, 1, 5]    segment_slots [NO_ADAPTER, 0]   (B and C share slot 0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from loraserve.kernels.constants import NO_ADAPTER
from loraserve.kernels.lora_tiles import (
    TILE_COLUMNS,
    LoraTiles,
    choose_tile_tokens,
    fill_tile_map,
    tile_bound,
)
from loraserve.models.batch import ForwardBatch, LoraBatch
from loraserve.scheduler.scheduler import ScheduledChunk

if TYPE_CHECKING:
    from loraserve.engine.runner.device_pool import DevicePool


class _Buffer:
    """One metadata buffer: a host array and its device twin (the same memory on a CPU)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        on_cuda = device.type == "cuda"
        self.host_tensor = torch.zeros(shape, dtype=dtype, pin_memory=on_cuda)
        self.host = self.host_tensor.numpy()
        self.device = torch.zeros(shape, dtype=dtype, device=device) if on_cuda else None

    def view(self, *sizes: int) -> torch.Tensor:
        """The first `sizes` of the device buffer, after copying that part from the host."""
        index = tuple(slice(0, size) for size in sizes)
        if self.device is None:
            return self.host_tensor[index]
        target = self.device[index]
        target.copy_(self.host_tensor[index], non_blocking=True)
        return target


class BatchMetadata:
    """Builds a step's `ForwardBatch` from its chunks, into preallocated buffers."""

    def __init__(
        self,
        max_num_tokens: int,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        block_size: int,
        max_lora_rank: int,
        device: torch.device,
    ) -> None:
        self.block_size = block_size
        self.max_lora_rank = max_lora_rank
        self.max_blocks_per_seq = max_blocks_per_seq
        int32, int64 = torch.int32, torch.int64
        self.input_ids = _Buffer((max_num_tokens,), int64, device)
        self.positions = _Buffer((max_num_tokens,), int64, device)
        self.slot_mapping = _Buffer((max_num_tokens,), int64, device)
        self.query_starts = _Buffer((max_num_seqs + 1,), int32, device)
        self.context_lens = _Buffer((max_num_seqs,), int32, device)
        self.block_tables = _Buffer((max_num_seqs, max_blocks_per_seq), int32, device)
        # A sampling row per sequence, then at most one extra row per token (prompt logprobs).
        self.logits_indices = _Buffer((max_num_seqs + max_num_tokens,), int64, device)
        self.segment_starts = _Buffer((max_num_seqs + 1,), int32, device)
        self.segment_slots = _Buffer((max_num_seqs,), int32, device)
        # The LoRA kernels' tile map (kernels/lora_tiles.py): never more tiles than tokens.
        max_tiles = max(max_num_tokens, max_num_seqs)
        self.lora_tiles = _Buffer((max_tiles, TILE_COLUMNS), int32, device)
        self.lora_num_tiles = _Buffer((1,), int32, device)

    def build(
        self,
        chunks: Sequence[ScheduledChunk],
        adapters: DevicePool,
        pad_to: int | None = None,
        extra_logits: Sequence[int] = (),
    ) -> ForwardBatch:
        """The forward batch of `chunks`, in their order (the scheduler grouped them by slot).

        `extra_logits`: flat token indices whose logits are wanted too, after the sampling
        rows (not with `pad_to`).

        `pad_to` (CUDA-graph replay of a decode batch): fill the batch up to that many
        one-token sequences whose results are never read (no adapter, KV writes skipped,
        context 1), give every table its full static width and LoRA the largest rank,
        so that every shape is the captured graph's."""
        num_seqs = len(chunks)
        lens = np.fromiter((chunk.num_tokens for chunk in chunks), np.int64, num_seqs)
        starts = np.fromiter((chunk.start for chunk in chunks), np.int64, num_seqs)
        query_starts = self.query_starts.host
        query_starts[0] = 0
        np.cumsum(lens, out=query_starts[1 : num_seqs + 1])
        num_tokens = int(query_starts[num_seqs])
        width = self._fill_block_tables(chunks)
        self._fill_tokens(chunks, lens, starts, num_tokens)
        self.context_lens.host[:num_seqs] = starts + lens
        samples = np.fromiter((chunk.samples for chunk in chunks), np.bool_, num_seqs)
        num_logits = int(samples.sum())
        self.logits_indices.host[:num_logits] = query_starts[1 : num_seqs + 1][samples] - 1
        if extra_logits:
            assert pad_to is None, "a padded decode batch has no extra logits"
            self.logits_indices.host[num_logits : num_logits + len(extra_logits)] = extra_logits
            num_logits += len(extra_logits)
        num_segments, max_rank = self._fill_segments(chunks, adapters.slot_max_rank)
        decode = num_tokens == num_seqs  # every sequence brings one token (and every graph batch)
        if pad_to is not None:
            num_seqs, num_tokens, num_segments, num_logits, width = self._pad(
                num_seqs, num_segments, num_logits, pad_to
            )
            max_rank = self.max_lora_rank  # the captured graph's shapes
        lora_batch = None
        if max_rank > 0 or pad_to is not None:
            lora_batch = LoraBatch(
                self.segment_starts.view(num_segments + 1),
                self.segment_slots.view(num_segments),
                max(max_rank, 1),
                self._fill_lora_tiles(num_tokens, num_segments, decode, pad_to is not None),
            )
        return ForwardBatch(
            input_ids=self.input_ids.view(num_tokens),
            positions=self.positions.view(num_tokens),
            query_starts=self.query_starts.view(num_seqs + 1),
            context_lens=self.context_lens.view(num_seqs),
            block_tables=self.block_tables.view(num_seqs, width),
            slot_mapping=self.slot_mapping.view(num_tokens),
            logits_indices=self.logits_indices.view(num_logits),
            lora=lora_batch,
        )

    def _fill_tokens(
        self,
        chunks: Sequence[ScheduledChunk],
        lens: np.ndarray,
        starts: np.ndarray,
        num_tokens: int,
    ) -> None:
        """input_ids, positions and slot_mapping of every token."""
        input_ids = self.input_ids.host
        if num_tokens == len(chunks):  # decode: one token each, read in one pass
            input_ids[:num_tokens] = [chunk.seq.token_ids[chunk.start] for chunk in chunks]
        else:
            offset = 0
            for chunk in chunks:
                end = offset + chunk.num_tokens
                input_ids[offset:end] = chunk.seq.token_ids[
                    chunk.start : chunk.start + chunk.num_tokens
                ]
                offset = end
        seq_of_token = np.repeat(np.arange(len(chunks)), lens)  # [num_tokens]
        token_offsets = np.arange(num_tokens) - np.repeat(
            self.query_starts.host[: len(chunks)], lens
        )
        positions = self.positions.host[:num_tokens]
        positions[:] = starts[seq_of_token] + token_offsets
        pages = self.block_tables.host[seq_of_token, positions // self.block_size]
        self.slot_mapping.host[:num_tokens] = pages * self.block_size + positions % self.block_size

    def _fill_block_tables(self, chunks: Sequence[ScheduledChunk]) -> int:
        """Each sequence's pages, in order; returns the widest table's width."""
        tables = self.block_tables.host
        width = 1
        for row, chunk in enumerate(chunks):
            table = chunk.seq.block_table
            tables[row, : len(table)] = table
            width = max(width, len(table))
        return width

    def _fill_segments(
        self, chunks: Sequence[ScheduledChunk], slot_max_rank: list[int]
    ) -> tuple[int, int]:
        """Runs of consecutive chunks of one slot; returns (segments, largest adapter rank)."""
        starts, slots = self.segment_starts.host, self.segment_slots.host
        num_segments, offset, max_rank = 0, 0, 0
        starts[0] = 0
        for chunk in chunks:
            offset += chunk.num_tokens
            if num_segments and slots[num_segments - 1] == chunk.slot:
                starts[num_segments] = offset
                continue
            slots[num_segments] = chunk.slot
            num_segments += 1
            starts[num_segments] = offset
            if chunk.slot != NO_ADAPTER:
                max_rank = max(max_rank, slot_max_rank[chunk.slot])
        return num_segments, max_rank

    def _fill_lora_tiles(
        self, num_tokens: int, num_segments: int, decode: bool, padded: bool
    ) -> LoraTiles:
        """The tile map of the segments just filled. A padded (graph) batch launches the
        bucket's bound of tiles, the same for every batch of the bucket."""
        tile_tokens = choose_tile_tokens(num_tokens, num_segments, decode)
        starts = self.segment_starts.host[: num_segments + 1]
        slots = self.segment_slots.host[:num_segments]
        num_tiles = fill_tile_map(starts, slots, tile_tokens, self.lora_tiles.host)
        self.lora_num_tiles.host[0] = num_tiles
        max_tiles = tile_bound(num_tokens, num_segments, tile_tokens) if padded else num_tiles
        table = self.lora_tiles.view(max(max_tiles, 1), TILE_COLUMNS)
        return LoraTiles(table, self.lora_num_tiles.view(1), max_tiles, tile_tokens)

    def _pad(
        self, num_seqs: int, num_segments: int, num_logits: int, pad_to: int
    ) -> tuple[int, int, int, int, int]:
        """Pad a decode batch (one token per sequence) to `pad_to` sequences and segments."""
        assert num_seqs == int(self.query_starts.host[num_seqs]) <= pad_to, "pad_to is for decode"
        extra = slice(num_seqs, pad_to)
        self.input_ids.host[extra] = 0
        self.positions.host[extra] = 0
        self.slot_mapping.host[extra] = -1  # write nothing
        self.query_starts.host[num_seqs + 1 : pad_to + 1] = np.arange(num_seqs + 1, pad_to + 1)
        self.context_lens.host[extra] = 1
        self.block_tables.host[extra] = 0
        self.logits_indices.host[num_logits:pad_to] = np.arange(num_seqs, pad_to)
        # One NO_ADAPTER segment takes the padding tokens; the rest are empty.
        self.segment_starts.host[num_segments + 1 : pad_to + 1] = pad_to
        self.segment_slots.host[num_segments:pad_to] = NO_ADAPTER
        return pad_to, pad_to, pad_to, pad_to, self.max_blocks_per_seq
