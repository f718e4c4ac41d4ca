"""The device side of the unified pool: the one allocation, its KV view, the LoRA tables.

The bookkeeping (which page holds what) is memory/pool.py's, in pure Python; this
class owns the tensors and makes the copies the bookkeeping decided, as the model
runner applies a step's plan: each `AdapterLoad` copies the adapter's host pages
straight into its pool pages (one copy per run of consecutive pages, non-blocking, from
the host store's pinned memory on CUDA: no temporary on the device) and points its slot's
rows of the offset and rank tables at them (computed on the host, staged in pinned memory,
copied the same way). A slot's rows are rewritten by
every load into it, so rows of evicted adapters need no clearing: no batch names
a slot that was not loaded before the forward pass that reads it.

On CUDA the copies run on a side stream (engine/runner/copy_stream.py), so that a copy the
step does not need yet (an adapter brought in ahead of its request) overlaps the
forward pass; `wait_for` makes the forward wait for exactly the copies it reads, and
for any copy left from an earlier step (whose pages may hold KV now). On a CPU every
copy is done when `load` returns, on one thread (`cpu_threads.one_thread`).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence

import numpy as np
import torch

from loraserve.engine.runner.copy_stream import SideStreamCopies
from loraserve.engine.runner.cpu_threads import one_thread
from loraserve.memory.geometry import PoolGeometry
from loraserve.memory.latency_log import LatencyLog
from loraserve.memory.residency import AdapterLoad
from loraserve.models.arch import LORA_GROUPS, NUM_LORA_MODULES
from loraserve.models.batch import lora_tables


class DevicePool:
    """The pool tensor, its KV view, and the offset / rank tables the LoRA kernels read."""

    def __init__(
        self,
        geometry: PoolGeometry,
        num_pages: int,
        max_resident_adapters: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.geometry = geometry
        self.device = device
        # [num_pages, page_numel]: the one device allocation (untouched pages cost nothing on CPU)
        self.pages = torch.empty(num_pages, geometry.page_numel, dtype=dtype, device=device)
        # [num_pages, layers, 2, block_size, kv_heads, head_dim]: the KV view of every page
        self.kv_pages = self.pages[:, : geometry.kv_block_numel].view(
            num_pages, *geometry.kv_shape()
        )
        num_layers = geometry.num_layers
        # [slots, layers, modules, 3]: element offsets of A, B and DoRA's g; -1 = not targeted
        # (g: -1 for plain LoRA)
        self.lora_offsets = torch.full(
            (max_resident_adapters, num_layers, NUM_LORA_MODULES, 3),
            -1,
            dtype=torch.int64,
            device=device,
        )
        # [slots, layers, modules]: rank of each matrix pair; 0 = not targeted
        self.lora_ranks = torch.zeros(
            (max_resident_adapters, num_layers, NUM_LORA_MODULES), dtype=torch.int32, device=device
        )
        self.lora = lora_tables(self.lora_offsets, self.lora_ranks, LORA_GROUPS)
        """Per layer and module group, the views of both tables the LoRA kernels read."""
        self.slot_max_rank = [0] * max_resident_adapters
        """Largest rank of the adapter last loaded into each slot (host side, for batch shapes)."""
        self.load_seconds = LatencyLog()
        """Latencies of loads not yet taken by `drain_load_seconds`."""
        self.copies = SideStreamCopies(device) if device.type == "cuda" else None

    def load(self, loads: Sequence[AdapterLoad]) -> None:
        """Copy each adapter's host pages into its pool pages and write its table rows
        (on CUDA: queue the copies on the side stream)."""
        if not loads:
            return
        if self.copies is None:
            with one_thread():  # a CPU's copies: a few hundred KB each (cpu_threads.one_thread)
                for load in loads:
                    started = time.perf_counter()
                    self._load(load, *self._table_rows(load))
                    self.load_seconds.record(time.perf_counter() - started)
            return
        copies = self.copies
        for load in loads:  # the pinned sources live until the copies are done
            tables = self._table_rows(load)
            copy = lambda load=load, tables=tables: self._load(load, *tables)  # noqa: E731
            copies.run(load.slot, copy, keep=(load.adapter, tables))

    def wait_for(self, slots: Collection[int]) -> None:
        """Before a forward pass that reads the adapters in `slots`: order it after their
        copies (a no-op on a CPU, where copies are done already)."""
        if self.copies is not None:
            self.copies.wait_for(slots)

    def drain_load_seconds(self) -> list[float]:
        """The load latencies recorded since the last call; they are forgotten here."""
        if self.copies is not None:
            self.load_seconds.extend(self.copies.drain_seconds())
        return self.load_seconds.drain()

    def _table_rows(self, load: AdapterLoad) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot's rows of the offset table ([layers, modules, 3], pool offsets) and of the
        rank table, on the host (pinned on CUDA)."""
        host, page_numel = load.adapter, self.geometry.page_numel
        pages = np.array(load.pages, dtype=np.int64)
        local = host.local_offsets.numpy()  # [layers, modules, 3], from its host pages' start
        global_offsets = pages[np.maximum(local, 0) // page_numel] * page_numel + local % page_numel
        # numpy: a few µs for these small arrays, where torch's ops each cost more than that
        offsets = torch.from_numpy(np.where(local >= 0, global_offsets, -1))
        if self.device.type != "cuda":
            return offsets, host.ranks
        return offsets.pin_memory(), host.ranks.pin_memory()

    def _load(self, load: AdapterLoad, offsets: torch.Tensor, ranks: torch.Tensor) -> None:
        # [shards, num_pages, page_numel]: rank 0's process holds every rank's slabs, its own
        # first; a tensor-parallel worker is sent only its own (HostAdapter.rank_slabs)
        host_pages = load.adapter.pages[0]
        for pool_page, host_page, count in page_runs(load.pages):
            self.pages[pool_page : pool_page + count].copy_(
                host_pages[host_page : host_page + count], non_blocking=True
            )
        self.lora_offsets[load.slot].copy_(offsets, non_blocking=True)
        self.lora_ranks[load.slot].copy_(ranks, non_blocking=True)
        self.slot_max_rank[load.slot] = load.adapter.max_rank


def page_runs(pages: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first pool page, first host page, count) of each run of consecutive pool pages.

    Example: pool pages [7, 8, 9, 2, 3] -> [(7, 0, 3), (2, 3, 2)]."""
    runs: list[tuple[int, int, int]] = []
    for host_page, pool_page in enumerate(pages):
        if runs and runs[-1][0] + runs[-1][2] == pool_page:
            first, start, count = runs[-1]
            runs[-1] = (first, start, count + 1)
        else:
            runs.append((pool_page, host_page, 1))
    return runs
