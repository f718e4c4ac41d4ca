"""What one forward pass receives: a flat batch of tokens from many sequences.

Built once per step by the engine. Example with two sequences, one prefilling
4 new tokens on top of 16 cached ones (block size 16) and one decoding its 10th token:

    input_ids      [t0 t1 t2 t3 | u9]         num_tokens = 5
    positions      [16 17 18 19 | 9]
    query_starts   [0, 4, 5]                  where each sequence's new tokens begin
    context_lens   [20, 10]                   tokens in the pool after this step's write
    block_tables   [[7, 2], [5, -]]           pages of each sequence (padded)
    slot_mapping   [2*16+0 .. 2*16+3, 5*16+9] where each new token's K/V goes
    logits_indices [3, 4]                     the tokens whose logits are sampled

The device state every step reads (the pool's KV view, the pool itself, the LoRA
offset and rank tables) is not part of it: the model binds it once
(`LlamaModel.bind`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraserve.kernels.lora_tiles import LoraTiles


@dataclass(frozen=True)
class LoraTables:
    """The offset and rank tables of one module group of one layer (the model binds each,
    with the pool, into the `kernels.ops.LoraWeights` the LoRA kernels read).

    Views of the runner's `[slots, layers, modules, 3]` offset table and `[slots, layers,
    modules]` rank table, made once at start-up (the tables never move)."""

    a_offsets: torch.Tensor  # [num_slots, num_slices] int64, element offset of each A
    b_offsets: torch.Tensor  # [num_slots, num_slices] int64, element offset of each B
    ranks: torch.Tensor  # [num_slots, num_slices] int32, 0 = slice not adapted
    g_offsets: torch.Tensor  # [num_slots, num_slices] int64, DoRA's g; -1 = plain LoRA


def lora_tables(
    offsets: torch.Tensor, ranks: torch.Tensor, groups: tuple[tuple[int, ...], ...]
) -> list[list[LoraTables]]:
    """`[layer][group]` views of the offset table `[slots, layers, modules, 3]` and the rank
    table `[slots, layers, modules]`, one per module group (q/k/v, o, gate/up, down)."""
    tables = []
    for layer in range(offsets.shape[1]):
        row = []
        for group in groups:
            first, last = group[0], group[-1] + 1
            where = offsets[:, layer, first:last]  # [slots, num_slices, 3]
            row.append(
                LoraTables(where[..., 0], where[..., 1], ranks[:, layer, first:last], where[..., 2])
            )
        tables.append(row)
    return tables


@dataclass
class LoraBatch:
    """Which adapter each token uses (the adapters' weights and tables are bound to the model).

    Example: 4 sequences with adapter slots [-1, 0, 2, 1] and 3, 10, 5, 2 tokens ->
    segment_starts [0, 3, 13, 18, 20], segment_slots [-1, 0, 2, 1]; with 4-token tiles
    the tile map (kernels/lora_tiles.py) is (-1, 0, 3) (0, 3, 7) (0, 7, 11) (0, 11, 13)
    (2, 13, 17) (2, 17, 18) (1, 18, 20)."""

    segment_starts: torch.Tensor  # [num_segments + 1] int32
    segment_slots: torch.Tensor  # [num_segments] int32, NO_ADAPTER for base-model runs
    max_rank: int  # largest rank among the batch's adapters
    tiles: LoraTiles | None = None  # the Triton kernels' tile map; None: they build one


@dataclass
class ForwardBatch:
    """The tensors of one step; see the module docstring for an example."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    query_starts: torch.Tensor  # [num_seqs + 1] int32
    context_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64
    logits_indices: torch.Tensor  # [num_logits] int64
    lora: LoraBatch | None  # None when no token of the batch uses an adapter
    max_context_len: torch.Tensor | None = None  # [1] int32, max(context_lens) (attention)
    decode: bool = False
    """Every sequence brings one token (num_tokens == num_seqs, every CUDA-graph batch): the
    forward pass then rotates, writes the KV and attends in one op. Known from the batch's
    sizes on the host, so a graph set (all decode) captures that one path."""
