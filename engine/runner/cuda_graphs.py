"""Decode steps captured as CUDA graphs, one per batch-size bucket.

A decode step launches a few hundred small kernels; eagerly, the host's launch
cost sets its time. Captured once per bucket of batch sizes and replayed, the
step costs one launch. What makes replay valid:
- every input is a view of a buffer whose address never changes (the runner's
  `BatchMetadata` and `DevicePool`), refilled in place before each replay;
- every shape is the bucket's: a batch is padded to its bucket with sequences
  whose results are never read, block tables have their full width and LoRA
  the largest rank, so the kernels' grids are the captured ones (idle programs
  return early);
- the forward pass has no data-dependent Python control flow and no host syncs
  (models/llama.py); sampling happens after the replay, outside the graph.

Two graph sets, each with every bucket: one for batches in which some sequence uses an
adapter, one for batches with none, whose forward makes no LoRA launch at all (its
batch's `lora` is None). The batch the metadata builder made says which set replays it.

Only steps where every sequence computes one token and samples it are replayed;
prefill and mixed steps run eagerly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from loraserve.engine.runner.batch_metadata import BatchMetadata
    from loraserve.engine.runner.device_pool import DevicePool
    from loraserve.scheduler.scheduler import PlannedChunk

BUCKET_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
WARMUP_RUNS = 2


class DecodeGraphs:
    """Captured decode forwards by bucket; with no buckets (CPU, or graphs turned off) every
    step runs eagerly."""

    def __init__(self, buckets: Sequence[int], forward: Callable[[Any], torch.Tensor]) -> None:
        self.buckets = sorted(buckets)
        self._forward = forward
        # (bucket, with LoRA) -> the graph and its logits buffer
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._memory_pool: Any = None

    @classmethod
    def for_device(
        cls,
        device: torch.device,
        enabled: bool,
        max_batch_size: int,
        forward: Callable[[Any], torch.Tensor],
    ) -> DecodeGraphs:
        """Buckets up to `max_batch_size` sequences on CUDA when enabled, none otherwise."""
        if device.type != "cuda" or not enabled:
            return cls((), forward)
        buckets = [size for size in BUCKET_SIZES if size < max_batch_size] + [max_batch_size]
        return cls(sorted(set(buckets)), forward)

    def bucket_for(self, chunks: Sequence[PlannedChunk]) -> int | None:
        """The smallest bucket holding this batch, if it is a decode batch; else None."""
        if not self.buckets or len(chunks) > self.buckets[-1]:
            return None
        if not all(chunk.num_tokens == 1 and chunk.samples for chunk in chunks):
            return None
        return next(size for size in self.buckets if size >= len(chunks))

    def capture_all(self, metadata: BatchMetadata, adapters: DevicePool) -> None:
        """Capture every bucket of both sets, largest first (the largest sets the shared
        memory pool)."""
        for bucket in reversed(self.buckets):
            for with_lora in (True, False):
                batch = metadata.build([], adapters, pad_to=bucket, with_lora=with_lora)
                self._capture((bucket, with_lora), batch)

    def replay(self, bucket: int, batch: Any) -> torch.Tensor:
        """The logits `[bucket, vocab]` of `batch` (already written into the static buffers):
        the graph of its bucket in the set its LoRA (or lack of it) picks."""
        graph, logits = self._graphs[bucket, batch.lora is not None]
        graph.replay()  # the batch's tensors are the captured inputs, refilled in place
        return logits

    def _capture(self, key: tuple[int, bool], batch: Any) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up: Triton compiles, allocator settles
            for _ in range(WARMUP_RUNS):
                self._forward(batch)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._memory_pool):
            logits = self._forward(batch)
        if self._memory_pool is None:
            self._memory_pool = graph.pool()
        self._graphs[key] = (graph, logits)
