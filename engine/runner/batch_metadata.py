"""A step's batch metadata, built once per step into buffers allocated once at start-up.

The scheduler's chunks (already grouped by adapter slot) become the flat tensors the
forward pass and its kernels read (models/batch.py). Every tensor is a view of a
buffer sized by the limits of the configuration, allocated once: on a CPU no step
allocates, and a CUDA graph can replay over them. The host side is numpy over torch
memory, and on a CPU the forward pass reads it directly.

On CUDA a step makes one host-to-device copy (`_Upload`): the used part of every host
array is packed, one after the other, into one pinned staging buffer, copied at once into
its device twin, and the batch's tensors are views of that twin. Their addresses follow
from the batch's sizes alone, so every batch padded to one CUDA-graph bucket (with or
without LoRA) sees the addresses its graph captured. The block table goes last, packed to
its used width; one device copy then spreads it into the static `[max_num_seqs,
max_blocks_per_seq]` table that the kernels read (only the used columns move; columns past
a table's width are never read).

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
    max_context_len [9]                               (the attention's partition length)
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
from loraserve.scheduler.scheduler import PlannedChunk

if TYPE_CHECKING:
    from loraserve.engine.runner.device_pool import DevicePool


UPLOAD_ALIGNMENT = 16
"""Bytes: where each array starts in the packed upload (a multiple of every element size)."""


class _Buffer:
    """One metadata array on the host (numpy over torch memory)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.host_tensor = torch.zeros(shape, dtype=dtype)
        self.host = self.host_tensor.numpy()

    @property
    def num_bytes(self) -> int:
        return self.host.nbytes + UPLOAD_ALIGNMENT


class _Upload:
    """A step's host arrays packed into one pinned buffer, sent in one host-to-device copy."""

    def __init__(self, num_bytes: int, device: torch.device) -> None:
        on_cuda = device.type == "cuda"
        self.staging = torch.zeros(num_bytes, dtype=torch.uint8, pin_memory=on_cuda)
        self.device_bytes = torch.zeros(num_bytes, dtype=torch.uint8, device=device)
        self._staged = self.staging.numpy()
        self._cursor = 0
        self._sent: torch.cuda.Event | None = None

    def stage(self, buffer: _Buffer, *sizes: int) -> torch.Tensor:
        """Pack the first `sizes` of `buffer`; their device view (filled by `send`)."""
        if self._cursor == 0 and self._sent is not None:
            self._sent.synchronize()  # the last step's copy has read the staging buffer
        part = np.ascontiguousarray(buffer.host[tuple(slice(0, size) for size in sizes)])
        start = -(-self._cursor // UPLOAD_ALIGNMENT) * UPLOAD_ALIGNMENT
        end = start + part.nbytes
        self._staged[start:end] = part.reshape(-1).view(np.uint8)
        self._cursor = end
        return self.device_bytes[start:end].view(buffer.host_tensor.dtype).view(part.shape)

    def send(self) -> None:
        """The one copy of everything staged since the last `send`."""
        used = self._cursor
        self.device_bytes[:used].copy_(self.staging[:used], non_blocking=True)
        self._cursor = 0
        if self.device_bytes.is_cuda:
            self._sent = torch.cuda.Event()
            self._sent.record()


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
        packed: bool | None = None,
        tile_map: bool = True,
    ) -> None:
        """`packed`: send the step in one packed copy (`_Upload`); by default on CUDA only
        (a CPU's forward pass reads the host arrays; tests pack there too). `tile_map`:
        build the LoRA tile map into `LoraBatch.tiles`; the runner asks for it when its
        kernels read it (`Kernels.reads_tile_map`: Triton's), the native and torch kernels
        read the segments alone, so their steps skip it (~15 numpy calls). A harness that
        checks a graph's static inputs on those kernels asks for it itself."""
        self.tile_map = tile_map
        self.block_size = block_size
        self.max_lora_rank = max_lora_rank
        self.max_blocks_per_seq = max_blocks_per_seq
        int32, int64 = torch.int32, torch.int64
        self.input_ids = _Buffer((max_num_tokens,), int64)
        self.positions = _Buffer((max_num_tokens,), int64)
        self.slot_mapping = _Buffer((max_num_tokens,), int64)
        self.query_starts = _Buffer((max_num_seqs + 1,), int32)
        self.context_lens = _Buffer((max_num_seqs,), int32)
        self.max_context_len = _Buffer((1,), int32)
        self.block_tables = _Buffer((max_num_seqs, max_blocks_per_seq), int32)
        # A sampling row per sequence, then at most one extra row per token (prompt logprobs).
        self.logits_indices = _Buffer((max_num_seqs + max_num_tokens,), int64)
        self.segment_starts = _Buffer((max_num_seqs + 1,), int32)
        self.segment_slots = _Buffer((max_num_seqs,), int32)
        # The LoRA kernels' tile map (kernels/lora_tiles.py): never more tiles than tokens.
        max_tiles = max(max_num_tokens, max_num_seqs)
        self.lora_tiles = _Buffer((max_tiles, TILE_COLUMNS), int32)
        self.lora_num_tiles = _Buffer((1,), int32)
        self.upload: _Upload | None = None
        self.device_block_tables: torch.Tensor | None = None
        if device.type == "cuda" if packed is None else packed:
            buffers = [value for value in vars(self).values() if isinstance(value, _Buffer)]
            self.upload = _Upload(sum(buffer.num_bytes for buffer in buffers), device)
            # [max_num_seqs, max_blocks_per_seq]: the table the kernels read, static
            self.device_block_tables = torch.zeros_like(
                self.block_tables.host_tensor, device=device
            )

    def build(
        self,
        chunks: Sequence[PlannedChunk],
        adapters: DevicePool,
        pad_to: int | None = None,
        extra_logits: Sequence[int] = (),
        with_lora: bool = False,
    ) -> ForwardBatch:
        """The forward batch of `chunks`, in their order (the scheduler grouped them by slot).

        `extra_logits`: flat token indices whose logits are wanted too, after the sampling
        rows (not with `pad_to`).

        `pad_to` (CUDA-graph replay of a decode batch): fill the batch up to that many
        one-token sequences whose results are never read (no adapter, KV writes skipped,
        context 1), give every table its full static width and LoRA, when any chunk has
        an adapter, the largest rank, so that every shape is the captured graph's. A batch
        without adapters has no LoRA at all (`lora` None: the graph set without LoRA
        launches); `with_lora` gives any batch the LoRA tensors at the largest rank (capturing
        the other set, warming the kernels up)."""
        num_seqs = len(chunks)
        lens = np.fromiter((chunk.num_tokens for chunk in chunks), np.int64, num_seqs)
        starts = np.fromiter((chunk.start for chunk in chunks), np.int64, num_seqs)
        query_starts = self.query_starts.host
        query_starts[0] = 0
        np.cumsum(lens, out=query_starts[1 : num_seqs + 1])
        num_tokens = int(query_starts[num_seqs])
        width = used_width = self._fill_block_tables(chunks)
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
        if with_lora or (pad_to is not None and max_rank > 0):
            max_rank = self.max_lora_rank  # a captured graph's shapes, or a warm-up's
        self.max_context_len.host[0] = self.context_lens.host[:num_seqs].max(initial=1)
        view = self._view  # in a fixed order, the block table (of varying width) last
        batch = ForwardBatch(
            input_ids=view(self.input_ids, num_tokens),
            positions=view(self.positions, num_tokens),
            query_starts=view(self.query_starts, num_seqs + 1),
            context_lens=view(self.context_lens, num_seqs),
            max_context_len=view(self.max_context_len, 1),
            slot_mapping=view(self.slot_mapping, num_tokens),
            logits_indices=view(self.logits_indices, num_logits),
            lora=None,
            block_tables=self.block_tables.host_tensor,  # set below
            decode=decode,
        )
        if max_rank > 0:
            batch.lora = LoraBatch(
                view(self.segment_starts, num_segments + 1),
                view(self.segment_slots, num_segments),
                max_rank,
                self._fill_lora_tiles(num_tokens, num_segments, decode, pad_to is not None)
                if self.tile_map
                else None,
            )
        batch.block_tables = self._block_tables(num_seqs, used_width, width)
        return batch

    def _view(self, buffer: _Buffer, *sizes: int) -> torch.Tensor:
        """The first `sizes` of `buffer` as the forward pass reads them: the host tensor on a
        CPU, on CUDA a view of the upload (its data arrives with the step's one copy)."""
        if self.upload is None:
            return buffer.host_tensor[tuple(slice(0, size) for size in sizes)]
        return self.upload.stage(buffer, *sizes)

    def _block_tables(self, num_seqs: int, used_width: int, width: int) -> torch.Tensor:
        """[num_seqs, width] of the table the kernels read. On CUDA: its used columns staged
        last, packed, then the step's one copy, then one device copy into the static table."""
        if self.upload is None or self.device_block_tables is None:
            return self.block_tables.host_tensor[:num_seqs, :width]
        packed = self.upload.stage(self.block_tables, num_seqs, used_width)
        self.upload.send()
        self.device_block_tables[:num_seqs, :used_width].copy_(packed)
        return self.device_block_tables[:num_seqs, :width]

    def _fill_tokens(
        self,
        chunks: Sequence[PlannedChunk],
        lens: np.ndarray,
        starts: np.ndarray,
        num_tokens: int,
    ) -> None:
        """input_ids, positions and slot_mapping of every token."""
        input_ids = self.input_ids.host
        if num_tokens == len(chunks):  # decode: one token each, read in one pass
            input_ids[:num_tokens] = [chunk.first_token for chunk in chunks]
        else:
            offset = 0
            for chunk in chunks:
                end = offset + chunk.num_tokens
                input_ids[offset:end] = chunk.token_ids
                offset = end
        seq_of_token = np.repeat(np.arange(len(chunks)), lens)  # [num_tokens]
        token_offsets = np.arange(num_tokens) - np.repeat(
            self.query_starts.host[: len(chunks)], lens
        )
        positions = self.positions.host[:num_tokens]
        positions[:] = starts[seq_of_token] + token_offsets
        pages = self.block_tables.host[seq_of_token, positions // self.block_size]
        self.slot_mapping.host[:num_tokens] = pages * self.block_size + positions % self.block_size

    def _fill_block_tables(self, chunks: Sequence[PlannedChunk]) -> int:
        """Each sequence's pages, in order; returns the widest table's width."""
        tables = self.block_tables.host
        width = 1
        for row, chunk in enumerate(chunks):
            table = chunk.block_table
            tables[row, : len(table)] = table
            width = max(width, len(table))
        return width

    def _fill_segments(
        self, chunks: Sequence[PlannedChunk], slot_max_rank: list[int]
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
        table = self._view(self.lora_tiles, max(max_tiles, 1), TILE_COLUMNS)
        return LoraTiles(table, self._view(self.lora_num_tiles, 1), max_tiles, tile_tokens)

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
