"""One decode step of a real-shaped model, timed eagerly and as a CUDA-graph replay.

The model runner's own parts (LlamaModel, DevicePool, BatchMetadata, DecodeGraphs) over a
model whose random weights are drawn on the device (no folder, no download: a 7B model
in seconds), with `num_adapters` random adapters per target set loaded through the pool,
and decode batches of sequences that each hold `context` tokens of KV. What it measures
is the forward pass of one decode step (sampling and the engine's bookkeeping excluded):

    bench = DecodeBench.build(SHAPES["llama-2-7b"], "cuda", torch.bfloat16, ...)
    chunks = bench.chunks(batch_size=32, targets="all7")
    bench.eager_ms(chunks), bench.graph_ms(chunks)

A decode step must read every weight, each sequence's K/V and each adapter of the batch
once: `step_bytes` is that floor, which bench/gpu_check.py sets against the copy ceiling.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from loraserve.engine.runner.batch_metadata import BatchMetadata
from loraserve.engine.runner.cuda_graphs import DecodeGraphs
from loraserve.engine.runner.device_pool import DevicePool
from loraserve.kernels.constants import NO_ADAPTER
from loraserve.kernels.dispatch import select_kernels
from loraserve.memory.adapter_store import NOT_TARGETED, HostAdapter, pack_matrices
from loraserve.memory.geometry import PoolGeometry
from loraserve.memory.residency import AdapterLoad
from loraserve.models.arch import LORA_MODULES, MODULE_INDEX, ModelArch, linear_parent
from loraserve.models.batch import ForwardBatch
from loraserve.models.llama import LlamaModel
from loraserve.scheduler.request import SequenceState
from loraserve.scheduler.scheduler import ScheduledChunk

BLOCK_SIZE = 16
TARGETS: dict[str, tuple[str, ...]] = {
    "base": (),
    "qkvo": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all7": LORA_MODULES,
}
"""The adapter sets of a measurement: none, the attention projections, every linear."""
INIT_STD = 0.02


def random_weights(arch: ModelArch, dtype: torch.dtype, device: torch.device) -> dict:
    """A checkpoint dict of `arch` (the names LlamaModel reads), normal(0, 0.02), norms at 1."""
    torch.manual_seed(0)

    def normal(*size: int) -> torch.Tensor:
        return torch.empty(size, dtype=dtype, device=device).normal_(0, INIT_STD)

    weights = {
        "model.embed_tokens.weight": normal(arch.vocab_size, arch.hidden_size),
        "model.norm.weight": torch.ones(arch.hidden_size, dtype=dtype, device=device),
        "lm_head.weight": normal(arch.vocab_size, arch.hidden_size),
    }
    for layer in range(arch.num_layers):
        prefix = f"model.layers.{layer}"
        for norm in arch.layer_norms:
            weights[f"{prefix}.{norm}.weight"] = torch.ones(
                arch.hidden_size, dtype=dtype, device=device
            )
        for module in arch.linear_modules:
            in_features, out_features = arch.module_dims(module)
            weights[f"{prefix}.{linear_parent(module)}.{module}.weight"] = normal(
                out_features, in_features
            )
    return weights


def random_adapter(
    name: str, arch: ModelArch, geometry: PoolGeometry, rank: int, modules: tuple[str, ...],
    dtype: torch.dtype, device: torch.device,
) -> HostAdapter:  # fmt: skip
    """A host adapter of `rank` on `modules` of every layer, packed as the adapter store packs
    one (A then B of each module), with small random entries."""
    pin_memory = device.type == "cuda"
    shape = (arch.num_layers, len(LORA_MODULES))
    sizes = [
        rank * dim for _ in range(arch.num_layers) for m in modules for dim in arch.module_dims(m)
    ]
    offsets, num_pages = pack_matrices(sizes, geometry.page_numel)
    drawn = torch.empty(num_pages, geometry.page_numel, dtype=dtype, device=device)
    pages = torch.empty(num_pages, geometry.page_numel, dtype=dtype, pin_memory=pin_memory)
    pages.copy_(drawn.normal_(0, INIT_STD))  # drawn on the device: a CPU's RNG takes seconds
    local_offsets = torch.full((*shape, 3), NOT_TARGETED, dtype=torch.int64)
    ranks = torch.zeros(shape, dtype=torch.int32)
    next_offset = iter(offsets)
    for layer in range(arch.num_layers):
        for module in modules:
            index = MODULE_INDEX[module]
            local_offsets[layer, index, 0] = next(next_offset)  # A
            local_offsets[layer, index, 1] = next(next_offset)  # B
            ranks[layer, index] = rank
    return HostAdapter(
        name, "", pages.unsqueeze(0), local_offsets, ranks, rank, modules, name.encode()
    )


@dataclass
class DecodeBench:
    """A random model bound to its pool, adapters resident, the runner's metadata builder."""

    arch: ModelArch
    model: LlamaModel
    pool: DevicePool
    metadata: BatchMetadata
    context: int
    slots: dict[str, list[int]]
    """Per target set of TARGETS, the pool slots of its adapters."""
    next_page: int
    """The first pool page that no adapter holds (KV pages are taken from there on)."""
    graphs: DecodeGraphs | None = None

    @classmethod
    def build(
        cls, arch: ModelArch, device: str, dtype: torch.dtype, kernel_backend: str,
        max_batch: int, context: int, num_adapters: int, rank: int,
    ) -> DecodeBench:  # fmt: skip
        torch_device = torch.device(device)
        kernels = select_kernels(kernel_backend, torch_device, dtype)
        model = LlamaModel(arch, random_weights(arch, dtype, torch_device), kernels, context + 1)
        geometry = PoolGeometry.for_model(arch, BLOCK_SIZE, rank)
        adapters = {
            targets: [
                random_adapter(f"{targets}-{i}", arch, geometry, rank, modules, dtype, torch_device)
                for i in range(num_adapters)
            ]
            for targets, modules in TARGETS.items()
            if modules
        }
        adapter_pages = sum(a.num_pages for group in adapters.values() for a in group)
        kv_pages = max_batch * -(-(context + 1) // BLOCK_SIZE)
        pool = DevicePool(geometry, adapter_pages + kv_pages, 2 * num_adapters, dtype, torch_device)
        pool.kv_pages.normal_(0, 1)  # K/V of plausible size (empty memory may hold NaNs)
        model.bind(pool.kv_pages, pool.pages, pool.lora)
        metadata = BatchMetadata(
            max_batch, max_batch, -(-(context + 1) // BLOCK_SIZE), BLOCK_SIZE, rank, torch_device
        )
        slots: dict[str, list[int]] = {"base": []}
        loads: list[AdapterLoad] = []
        page = 0
        for targets, group in adapters.items():
            slots[targets] = []
            for adapter in group:
                slot = len(loads)
                pages = tuple(range(page, page + adapter.num_pages))
                loads.append(AdapterLoad(adapter.name, slot, pages, adapter))
                slots[targets].append(slot)
                page += adapter.num_pages
        pool.load(loads)
        pool.wait_for(set(range(len(loads))))
        return cls(arch, model, pool, metadata, context, slots, page)

    def chunks(self, batch_size: int, targets: str) -> list[ScheduledChunk]:
        """A decode batch: sequence i holds `context` tokens (its last one computed now) in
        its own pages, with adapter i of the target set (cycled), grouped by slot."""
        pages_per_seq = -(-self.context // BLOCK_SIZE)
        slots = self.slots[targets]
        chunks = []
        for index in range(batch_size):
            token_ids = [(7 * index + t) % 1000 for t in range(self.context)]
            seq = SequenceState(str(index), None, token_ids)
            seq.num_computed_tokens = self.context - 1
            first = self.next_page + index * pages_per_seq
            seq.block_table = list(range(first, first + pages_per_seq))
            chunk = ScheduledChunk(seq, 1, slots[index % len(slots)] if slots else NO_ADAPTER)
            chunks.append(chunk)
        return sorted(chunks, key=lambda chunk: chunk.slot)

    def step_bytes(self, chunks: list[ScheduledChunk]) -> int:
        """What the step must read once: every weight, each sequence's K/V, each adapter."""
        arch, element = self.arch, self.pool.pages.element_size()
        weights = sum(i * o for i, o in map(arch.module_dims, arch.linear_modules))
        weights = weights * arch.num_layers + 2 * arch.vocab_size * arch.hidden_size
        kv = len(chunks) * self.context * arch.num_layers * 2 * arch.kv_size
        adapters = sum(
            self._adapter_numel(slot) for slot in {chunk.slot for chunk in chunks} - {NO_ADAPTER}
        )
        return (weights + kv + adapters) * element

    def _adapter_numel(self, slot: int) -> int:
        ranks = self.pool.lora_ranks[slot].cpu()  # [layers, modules]
        dims = [sum(self.arch.module_dims(module)) for module in LORA_MODULES]
        return int((ranks.double() * torch.tensor(dims, dtype=torch.float64)).sum())

    def eager_ms(self, chunks: list[ScheduledChunk], steps: int) -> float:
        """Milliseconds of an eager forward of the batch (built once, outside the timing)."""
        batch = self.metadata.build(chunks, self.pool)
        return _time_ms(lambda: self.model.forward(batch), steps, self.pool.pages.device)

    def capture(self, buckets: list[int]) -> None:
        """CUDA graphs of both sets (with and without LoRA) at these batch sizes."""
        self.graphs = DecodeGraphs(buckets, self.model.forward)
        self.graphs.capture_all(self.metadata, self.pool)

    def graph_ms(self, chunks: list[ScheduledChunk], steps: int) -> float:
        """Milliseconds of a replay of the batch's graph (its static buffers filled once)."""
        assert self.graphs is not None, "capture first"
        bucket = next(size for size in self.graphs.buckets if size >= len(chunks))
        batch = self.metadata.build(chunks, self.pool, pad_to=bucket)
        graphs = self.graphs
        return _time_ms(lambda: graphs.replay(bucket, batch), steps, self.pool.pages.device)

    def build_ms(self, chunks: list[ScheduledChunk], steps: int) -> float:
        """Milliseconds of the host's metadata build of the batch (padded to its bucket)."""
        pad_to = len(chunks)
        return _time_ms(lambda: self.metadata.build(chunks, self.pool, pad_to=pad_to), steps, None)

    def forward_of(self, chunks: list[ScheduledChunk], graph: bool) -> Callable[[], object]:
        """One step of the batch, as a call (for the profiler)."""
        if not graph or self.graphs is None:
            batch: ForwardBatch = self.metadata.build(chunks, self.pool)
            return lambda: self.model.forward(batch)
        bucket = next(size for size in self.graphs.buckets if size >= len(chunks))
        padded = self.metadata.build(chunks, self.pool, pad_to=bucket)
        graphs = self.graphs
        return lambda: graphs.replay(bucket, padded)


def _time_ms(step: Callable[[], object], steps: int, device: torch.device | None) -> float:
    """Median milliseconds of `step` over batches of `steps` calls, after two warm-up calls."""
    for _ in range(2):
        step()
    timings = []
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        timings.append((time.perf_counter() - start) / steps)
    return 1e3 * sorted(timings)[1]


def synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
