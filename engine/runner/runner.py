"""The model runner: everything of a step that touches the device.

The engine core decides (requests, scheduler, pool bookkeeping, stops); the runner
executes: it owns the model, the kernels, the device side of the unified pool,
the per-step metadata buffers, the sampling batch (every running request's sampling
parameters, seeded generator and token counts, engine/sampling/sampling_batch.py) and,
on CUDA, the captured decode graphs. One call per step:

    sampled = runner.execute(step)    # step = Step(scheduler.schedule(), started, finished)

sets up the requests the step starts (seeded generator, grammar, prompt-logprob
progress) and forgets those that ended, copies the adapters the plan brings in (on CUDA
on a side stream, waited for only by a forward that reads them), builds the batch
metadata once, runs the forward pass and samples one token for each chunk that reaches
its sequence's end. The step is its only input: nothing else tells it of requests.
`ModelRunner` is the engine's view of it (tests drive the engine with a fake one).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import numpy as np
import torch

from loraserve.engine.core.config import (
    DTYPES,
    EngineConfig,
    available_cores,
    resolve_max_model_len,
)
from loraserve.engine.core.request import ShardStep, Step
from loraserve.engine.core.sampling_params import SamplingParams
from loraserve.engine.runner.batch_metadata import BatchMetadata
from loraserve.engine.runner.collectives import RankCollectives
from loraserve.engine.runner.cpu_threads import ThreadGovernor
from loraserve.engine.runner.cuda_graphs import DecodeGraphs
from loraserve.engine.runner.device_pool import DevicePool
from loraserve.engine.sampling.constraints import GrammarMasks
from loraserve.engine.sampling.prompt_logprobs import (
    PromptProgress,
    PromptRows,
    gather_prompt_logprobs,
    plan_prompt_rows,
)
from loraserve.engine.sampling.sampler import SamplerOutput, sample
from loraserve.engine.sampling.sampling_batch import SamplingBatch, SamplingRows
from loraserve.engine.sampling.structured import RequestGrammar, fill_masks
from loraserve.kernels.constants import NO_ADAPTER
from loraserve.kernels.dispatch import select_kernels
from loraserve.memory.geometry import PoolGeometry
from loraserve.memory.residency import AdapterLoad
from loraserve.models.arch import ModelArch
from loraserve.models.llama import LlamaModel
from loraserve.models.tensor_parallel import shard_arch
from loraserve.models.weights import load_weights
from loraserve.scheduler.request import SequenceState
from loraserve.scheduler.scheduler import PlannedChunk, ScheduledChunk

logger = logging.getLogger(__name__)

CPU_DEFAULT_POOL_GIB = 1.0
PREFILL_WARMUP_TOKENS = (1, 17, 128)
"""Prompt lengths run once at start-up on CUDA (besides the longest the token budget allows),
so that the prefill kernels compile before the first request, not during it."""
MAX_GRAPH_BATCH_SIZE = 512  # larger decode batches run eagerly (their launch cost is amortized)
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}


class ModelRunner(Protocol):
    """What the engine core needs of the device side."""

    num_pages: int
    """Pages of the unified pool (fixed at start-up)."""
    kernel_backend: str
    """The kernels in use (triton, native, torch or reference)."""
    device: torch.device
    dtype: torch.dtype
    """The pool's and the activations' dtype (the adapter store converts to it)."""
    warmup_seconds: float
    """How long the start-up warm-up took (graph captures, Triton compiles)."""

    def execute(self, step: Step) -> SamplerOutput:
        """Run one step: forget the requests that ended, set up those that start (the
        engine advances their grammars after each step; the runner only reads the masks),
        load adapters, forward, sample one token per sampling chunk (in plan order). A plan
        of copies only runs no forward."""
        ...

    def drain_load_seconds(self) -> list[float]:
        """Adapter copy latencies recorded since the last call (for metrics)."""
        ...

    def base_weight(self, layer: int, module: str) -> torch.Tensor:
        """memory.dora.BaseWeights: a base linear's weight, which DoRA adapters are read against."""
        ...

    def check(self) -> None:
        """EngineError when the device side can no longer run (a tensor-parallel rank died)."""
        ...


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when there is one; ValueError for a CUDA device this torch cannot use."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        build = f"for CUDA {torch.version.cuda}" if torch.version.cuda else "for the CPU only"
        raise ValueError(
            f"device {name}: no CUDA device is available (torch {torch.__version__} is "
            f"built {build}); use --device cpu"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    return device


def resolve_dtype(name: str, checkpoint_dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: float32 on a CPU, the checkpoint's dtype on CUDA."""
    if name != "auto":
        return TORCH_DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    return TORCH_DTYPES.get(checkpoint_dtype, torch.bfloat16)


class TorchModelRunner:
    """The runner of a Llama-family model on one device, in torch."""

    def __init__(
        self,
        config: EngineConfig,
        arch: ModelArch,
        geometry: PoolGeometry,
        eos_token_ids: tuple[int, ...],
        collectives: RankCollectives | None = None,
    ) -> None:
        """`collectives`: under tensor parallelism, this rank's group; the runner then holds
        the rank's shard of the model (models/tensor_parallel.py) and of every adapter, and
        `geometry` is a rank's page geometry."""
        self.config, self.arch = config, arch
        self.collectives = collectives
        self.device = (
            collectives.device if collectives is not None else resolve_device(config.model.device)
        )
        threads = config.model.cpu_threads or min(torch.get_num_threads(), available_cores())
        if self.device.type == "cpu":
            torch.set_num_threads(threads)  # the native kernels follow it
        self.threads = ThreadGovernor(threads if self.device.type == "cpu" else 1)
        """On a CPU shared with other work, one thread may beat many: measured step by step."""
        self.dtype = resolve_dtype(config.model.dtype, arch.torch_dtype, self.device)
        shard = None if collectives is None else collectives.shard  # read: the rank's part
        weights = load_weights(config.model.model, arch, self.dtype, self.device, shard)
        self.kernels = select_kernels(config.model.kernel_backend, self.device, self.dtype)
        self.kernel_backend = self.kernels.name
        max_model_len = resolve_max_model_len(arch, config.model.max_model_len)
        model_arch = arch if collectives is None else shard_arch(arch, collectives.shard.size)
        self.model = LlamaModel(model_arch, weights, self.kernels, max_model_len, collectives)
        del weights
        scheduler = config.scheduler
        # Before the pool is sized, so that on CUDA the free memory it measures excludes it.
        self.sampling = SamplingBatch(
            scheduler.max_num_seqs, arch.vocab_size, eos_token_ids, self.device
        )
        self.num_pages = self._num_pages(geometry)
        if collectives is not None:  # one page accounting for every rank: the smallest pool
            self.num_pages = collectives.agree_min(self.num_pages)
        lora = config.lora
        self.pool = DevicePool(
            geometry, self.num_pages, config.resident_adapter_slots, self.dtype, self.device
        )
        self.model.bind(self.pool.kv_pages, self.pool.pages, self.pool.lora)
        max_blocks = -(-max_model_len // geometry.block_size)
        self.metadata = BatchMetadata(
            scheduler.max_num_batched_tokens,
            scheduler.max_num_seqs,
            max_blocks,
            geometry.block_size,
            lora.max_lora_rank,
            self.device,
            tile_map=self.kernels.reads_tile_map,
        )
        self.graphs = DecodeGraphs.for_device(
            self.device,
            # The torch paths read metadata on the host (syncs): only Triton can be captured.
            # Collectives inside a graph are not yet verified on a device: ranks run eagerly.
            not config.model.enforce_eager
            and self.kernel_backend == "triton"
            and collectives is None,
            min(scheduler.max_num_seqs, MAX_GRAPH_BATCH_SIZE),
            self.model.forward,
        )
        self.warmup_seconds = self._warm_up()
        self._prompt_progress: dict[str, PromptProgress] = {}
        # Grammar masks are computed here while the forward pass runs (llguidance lets go
        # of the GIL), so that structured output costs the step only their application.
        self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="loraserve-grammar")

    # -- requests ----------------------------------------------------------------------------

    def _start(
        self, request_id: str, params: SamplingParams, grammar: RequestGrammar | None
    ) -> None:
        self.sampling.add(request_id, params, grammar)
        if params.prompt_logprobs is not None:
            self._prompt_progress[request_id] = PromptProgress(params.prompt_logprobs)

    def _forget(self, request_id: str) -> None:
        self.sampling.remove(request_id)
        self._prompt_progress.pop(request_id, None)

    # -- the step ----------------------------------------------------------------------------

    def execute(self, step: Step) -> SamplerOutput:
        for request_id in step.finished:
            self._forget(request_id)
        for state in step.started:
            self._start(state.request.request_id, state.params, state.grammar)
        plan = step.plan
        prompt_rows = plan_prompt_rows(plan.chunks, self._prompt_progress)
        self._share(plan.chunks, plan.adapter_loads, prompt_rows.flat_indices)
        self.pool.load(plan.adapter_loads)
        if not plan.chunks:  # copies only
            return SamplerOutput([], [], [])
        self.pool.wait_for({chunk.slot for chunk in plan.chunks})
        rows = self.sampling.rows([chunk.seq for chunk in plan.chunks if chunk.samples])
        masks = self._start_masks(rows.grammars)
        output, logits = self.threads.run(
            plan.num_batched_tokens,
            lambda: self._forward_and_sample(plan.chunks, prompt_rows, rows, masks),
        )
        self.sampling.append(rows, output.token_ids)
        output.prompt_logprobs = gather_prompt_logprobs(logits[rows.num_rows :], prompt_rows)
        return output

    def _share(
        self, chunks: list[ScheduledChunk], loads: list[AdapterLoad], extra_logits: list[int]
    ) -> None:
        """Under tensor parallelism, rank 0 hands the step to the other ranks here, before
        its own copies and forward pass (engine/runner/tensor_parallel.py); else nothing."""

    def execute_shard(self, step: ShardStep, loads: list[AdapterLoad]) -> None:
        """A rank other than 0: the step's copies (`loads`: this rank's slabs) and forward
        pass, in step with rank 0's (the collectives meet); its logits are rank 0's to sample."""
        self.pool.load(loads)
        if not step.chunks:
            return
        self.pool.wait_for({chunk.slot for chunk in step.chunks})
        self.threads.run(
            sum(chunk.num_tokens for chunk in step.chunks),
            lambda: self._logits(step.chunks, step.extra_logits),
        )

    def _forward_and_sample(
        self,
        chunks: Sequence[ScheduledChunk],
        prompt_rows: PromptRows,
        rows: SamplingRows,
        masks: Future[GrammarMasks] | None,
    ) -> tuple[SamplerOutput, torch.Tensor]:
        logits = self._logits(chunks, prompt_rows.flat_indices)  # [sampling + prompt rows, vocab]
        output = sample(logits[: rows.num_rows], rows, None if masks is None else masks.result())
        return output, logits

    def _start_masks(
        self, grammars: list[tuple[int, RequestGrammar]]
    ) -> Future[GrammarMasks] | None:
        """The grammar masks of the (row, grammar) pairs, computed in a thread."""
        if not grammars:
            return None

        def compute() -> GrammarMasks:
            bitmask: np.ndarray = fill_masks([grammar for _, grammar in grammars])
            return GrammarMasks([row for row, _ in grammars], torch.from_numpy(bitmask))

        return self._mask_thread.submit(compute)

    def drain_load_seconds(self) -> list[float]:
        return self.pool.drain_load_seconds()

    def check(self) -> None:
        pass

    def base_weight(self, layer: int, module: str) -> torch.Tensor:
        # Called from the adapter loader threads: a read of weights that never change.
        return self.model.base_weight(layer, module)

    def _logits(self, chunks: Sequence[PlannedChunk], extra: list[int]) -> torch.Tensor:
        """Logits of the sampling chunks, then of the prompt-logprob rows (`extra`, flat
        token indices): a graph replay for a decode batch it covers (which has no prompt rows)."""
        bucket = None if extra else self.graphs.bucket_for(chunks)
        if bucket is not None:
            batch = self.metadata.build(chunks, self.pool, pad_to=bucket)
            return self.graphs.replay(bucket, batch)[: sum(chunk.samples for chunk in chunks)]
        return self.model.forward(self.metadata.build(chunks, self.pool, extra_logits=extra))

    def _warm_up(self) -> float:
        """Before the first request: capture every decode bucket of both graph sets and, on
        CUDA, run prefill batches of a few lengths, with and without LoRA (Triton compiles
        each shape once, here, not in a request's step). Logs and returns the seconds."""
        started = time.perf_counter()
        self.graphs.capture_all(self.metadata, self.pool)
        if self.device.type == "cuda":
            for chunks in self._prefill_warmup_chunks():
                for with_lora in (False, True):
                    self.model.forward(self.metadata.build(chunks, self.pool, with_lora=with_lora))
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        logger.info(
            "warm-up: %d decode graphs and the prefill shapes in %.1f s",
            2 * len(self.graphs.buckets), seconds,
        )  # fmt: skip
        return seconds

    def _prefill_warmup_chunks(self) -> list[list[ScheduledChunk]]:
        """One prompt of each warm-up length, in pages the pool has not handed out yet (at
        start-up every page is free; the K/V written there is overwritten before any read)."""
        block_size = self.metadata.block_size
        budget = min(self.config.scheduler.max_num_batched_tokens, self.num_pages * block_size)
        budget = min(budget, self.metadata.max_blocks_per_seq * block_size)
        batches = []
        for length in sorted({*PREFILL_WARMUP_TOKENS, budget}):
            if length > budget:
                continue
            seq = SequenceState("warm-up", None, [0] * length)
            seq.block_table = list(range(-(-length // block_size)))
            batches.append([ScheduledChunk(seq, length, NO_ADAPTER)])
        return batches

    def _num_pages(self, geometry: PoolGeometry) -> int:
        """Pages in the pool: as configured, or what memory allows."""
        cache = self.config.cache
        page_bytes = geometry.page_numel * torch.empty((), dtype=self.dtype).element_size()
        if cache.pool_pages is not None:
            return cache.pool_pages
        if cache.pool_memory_gib is not None or self.device.type != "cuda":
            gib = cache.pool_memory_gib or CPU_DEFAULT_POOL_GIB
            return max(2, int(gib * 2**30) // page_bytes)
        free, total = torch.cuda.mem_get_info(self.device)
        budget = total * cache.gpu_memory_utilization - (total - free)
        budget -= self._activation_reserve_bytes()
        if budget < 2 * page_bytes:
            raise ValueError(
                f"gpu_memory_utilization={cache.gpu_memory_utilization} leaves no room for the pool "
                f"after the weights ({(total - free) / 2**30:.1f} GiB used of {total / 2**30:.1f})"
            )
        return int(budget // page_bytes)

    def _activation_reserve_bytes(self) -> int:
        """A generous bound on one step's activations (float32 logits included)."""
        arch, tokens = self.arch, self.config.scheduler.max_num_batched_tokens
        per_token = 4 * (6 * arch.hidden_size + 4 * arch.intermediate_size + arch.vocab_size)
        return tokens * per_token + 512 * 2**20
