"""How a model and its adapters are split over tensor-parallel ranks (Megatron's split,
S-LoRA's for the adapters), as pure functions of the architecture and a rank.

One rank holds:
- q/k/v and gate/up by output rows ("column parallel"): its heads' q, its KV heads' k and
  v (each KV head on `num_kv_heads / size` ranks' worth of query heads; with fewer KV heads
  than ranks a KV head is replicated, as vLLM does), its slice of the MLP's intermediate;
- o and down by input columns ("row parallel"): each rank's product is a partial sum of the
  output, which one all-reduce per projection completes (o's bias added by rank 0 only);
- the embedding and the LM head by vocabulary rows, padded to equal slices: a token's row
  lives on one rank (the others add zeros, one all-reduce), each rank's logits are its
  slice of the vocabulary (one all-gather);
- norms, RoPE tables and everything of size `hidden` whole.

The adapters follow the base layer's split, so that LoRA adds no collective of its own:
- column-parallel modules: A whole ([r, hidden], every rank reads the same input), B by the
  same output rows as the base weight (each rank writes its own output slice);
- row-parallel modules (o, down): A by the same input columns as the base weight, B whole:
  each rank adds (x_rank @ A_rank.T) @ B.T to its partial output, and the base layer's one
  all-reduce sums the ranks' partial products with the base's. DoRA's g (one per output row,
  computed from the whole W) scales each partial sum alike, so the sum is g times the whole.
This is S-LoRA's partition with its all-gather of the low-rank intermediate folded into the
base all-reduce (which exists anyway): no collective and no byte is added per LoRA group.

Every rank's shard has the same shapes (`shard_arch`), so every rank's adapter layout,
page count and page offsets are the same: one page accounting serves all ranks.

Example, Llama GQA with 8 query heads, 2 KV heads, intermediate 64, vocab 100, 2 ranks:
rank 1 holds query heads 4-7, KV head 1, intermediate rows 32-63, vocabulary rows 50-99.
With 4 ranks, KV head 1 is held by ranks 2 and 3 (each with 2 query heads).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from loraserve.models.arch import FUSED_MODULES, LORA_MODULES, ModelArch, linear_parent

EMBEDDING, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
COLUMN_PARALLEL = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"})
"""Linear layers split by output rows (their fused forms follow their parts)."""
ROW_PARALLEL = frozenset({"o_proj", "down_proj"})
"""Linear layers split by input columns; their partial outputs are summed by an all-reduce."""


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `size` tensor-parallel ranks."""

    rank: int
    size: int


class Collectives(Protocol):
    """The collectives of one rank's forward pass (engine/runner/collectives.py)."""

    shard: Shard

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """tensor = the sum of every rank's `tensor`, in place."""
        ...

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor`, concatenated along the last dimension in rank order."""
        ...


def check_divisible(arch: ModelArch, size: int) -> None:
    """ValueError, in one line, when `arch` cannot be split over `size` ranks."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {size}")
    problems = []
    if arch.num_heads % size:
        problems.append(f"{arch.num_heads} attention heads")
    kv = arch.num_kv_heads
    if (kv % size) if kv >= size else (size % kv):
        problems.append(f"{kv} KV heads (a multiple of the ranks, or dividing them)")
    if arch.intermediate_size % size:
        problems.append(f"an intermediate size of {arch.intermediate_size}")
    if problems:
        raise ValueError(
            f"tensor_parallel_size {size} does not divide the model's {', '.join(problems)}"
        )


def shard_arch(arch: ModelArch, size: int) -> ModelArch:
    """The architecture one rank computes: its heads, its KV heads, its MLP slice (the
    vocabulary and `hidden_size` stay whole; `vocab_rows` says a rank's slice)."""
    check_divisible(arch, size)
    return dataclasses.replace(
        arch,
        num_heads=arch.num_heads // size,
        num_kv_heads=max(1, arch.num_kv_heads // size),
        intermediate_size=arch.intermediate_size // size,
    )


def vocab_rows(vocab_size: int, shard: Shard) -> tuple[int, int]:
    """(first row, rows) of the rank's vocabulary slice: ceil(vocab / size) rows each, the
    last slice padded with zero rows past the vocabulary."""
    rows = -(-vocab_size // shard.size)
    return shard.rank * rows, rows


def output_rows(arch: ModelArch, module: str, shard: Shard) -> slice:
    """The rows of column-parallel `module`'s output (`q_proj`, ..., `up_proj`) the rank holds."""
    if module in ("k_proj", "v_proj"):
        per_rank = shard_arch(arch, shard.size).num_kv_heads
        if arch.num_kv_heads >= shard.size:
            first = shard.rank * per_rank
        else:  # replicated: ranks size/kv at a time share one KV head
            first = shard.rank // (shard.size // arch.num_kv_heads)
        return slice(first * arch.head_dim, (first + per_rank) * arch.head_dim)
    width = arch.module_dims(module)[1] // shard.size
    return slice(shard.rank * width, (shard.rank + 1) * width)


def input_columns(arch: ModelArch, module: str, shard: Shard) -> slice:
    """The columns of row-parallel `module`'s input (`o_proj`, `down_proj`) the rank holds."""
    width = arch.module_dims(module)[0] // shard.size
    return slice(shard.rank * width, (shard.rank + 1) * width)


def fused_part_rows(arch: ModelArch, fused: str, shard: Shard) -> list[slice]:
    """The rank's rows of a fused output (`qkv_proj`, `gate_up_proj`), part by part, as
    offsets into the fused rows."""
    parts, offset, rows = [LORA_MODULES[slot] for slot in FUSED_MODULES[fused]], 0, []
    for part in parts:
        own = output_rows(arch, part, shard)
        rows.append(slice(offset + own.start, offset + own.stop))
        offset += arch.module_dims(part)[1]
    return rows


def shard_linear(arch: ModelArch, module: str, tensor: Any, shard: Shard, axis: str) -> Any:
    """The rank's part of a tensor laid out along `module`'s output rows (`axis` "out": a
    weight's rows, a bias, a LoRA B, DoRA's g) or its input columns (`axis` "in": a weight's
    or a LoRA A's columns, of a 2-d tensor). A tensor on an axis the module does not split
    is returned whole, and so is every tensor on one rank. `tensor`: a torch tensor or a
    safetensors slice."""
    if shard.size == 1:
        return tensor
    if axis == "in":
        if module not in ROW_PARALLEL:
            return tensor
        return tensor[:, input_columns(arch, module, shard)]
    if module in ROW_PARALLEL:
        return tensor
    if module in FUSED_MODULES:
        return torch.cat([tensor[rows] for rows in fused_part_rows(arch, module, shard)])
    return tensor[output_rows(arch, module, shard)]


def shard_tensor(name: str, tensor: Any, arch: ModelArch, shard: Shard) -> torch.Tensor:
    """The rank's part of checkpoint tensor `name`, in storage of its own (a copy, not a view
    of the whole). `tensor` is a torch tensor or anything sliced like one: a safetensors
    slice, so that a rank reads from the file only the rows and columns it keeps."""
    if name in (EMBEDDING, LM_HEAD):
        first, rows = vocab_rows(arch.vocab_size, shard)
        part = tensor[first : first + rows]
        if part.shape[0] < rows:  # the last slice: zero rows past the vocabulary
            part = torch.cat([part, part.new_zeros(rows - part.shape[0], part.shape[1])])
        return _own(part)
    module = name.rsplit(".", 2)[-2] if ".layers." in name else ""
    if module in ROW_PARALLEL and name.endswith(".bias"):
        whole = tensor[:]
        return whole if shard.rank == 0 else torch.zeros_like(whole)
    if module in COLUMN_PARALLEL or module in FUSED_MODULES:
        return _own(shard_linear(arch, module, tensor, shard, "out"))
    if module in ROW_PARALLEL:
        return _own(shard_linear(arch, module, tensor, shard, "in"))
    return _own(tensor[:])


def _own(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in storage of its own size (a slice is copied out of the whole)."""
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.nbytes:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def checkpoint_name(layer: int, module: str) -> str:
    """The checkpoint's name of a decoder layer's linear weight."""
    return f"model.layers.{layer}.{linear_parent(module)}.{module}.weight"
