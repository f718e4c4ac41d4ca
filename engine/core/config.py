"""The engine's configuration: one frozen dataclass per part, gathered in `EngineConfig`.

Each field's docstring doubles as its `--help` text in the CLI. Values found at run
time (the page count after profiling, the model's EOS ids) live in `RuntimeInfo`,
never written back here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraserve.kernels.constants import KERNEL_BACKENDS
from loraserve.models.arch import ModelArch
from loraserve.models.hub import is_repo_id, resolve_model
from loraserve.scheduler.config import SchedulerConfig

DTYPES = ("float32", "float16", "bfloat16")
RESIDENT_HEADROOM = 128
"""Adapter slots beyond a full batch's (`LoraConfig.max_resident_adapters` unset): room for
pinned adapters and those brought in ahead of their requests. A slot costs one row of the
offset tables (layers x 7 x 3 int64), nothing per step."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class ModelConfig:
    """The base model and where it runs."""

    model: str
    """Local Hugging Face model folder (config.json, safetensors, tokenizer.json)."""
    device: str = "auto"
    """`cpu`, `cuda`, `cuda:N`, or `auto` (cuda when available)."""
    dtype: str = "auto"
    """float32 | float16 | bfloat16 | auto (the checkpoint's dtype on CUDA, float32 on CPU)."""
    max_model_len: int | None = None
    """Longest prompt + output, in tokens (default: the model's max_position_embeddings)."""
    kernel_backend: str = "auto"
    """auto (Triton on CUDA; on a CPU native C kernels for float32 when a C compiler is
    there, else torch) | triton | native (C, CPU float32; compiled on first use) | torch
    (the torch path: torch calls, any dtype) | reference (plain, slow)."""
    served_model_name: tuple[str, ...] = field(
        default=(), metadata={"nargs": "+", "metavar": "NAME"}
    )
    """Names of the base model in the API: requests may use any; responses and metrics say the
    first (default: the folder's name; `--model` as given, vLLM's default name, is accepted too)."""
    tensor_parallel_size: int = field(default=1, metadata={"aliases": ("-tp",)})
    """Devices (ranks) the model is split over (`-tp`; vLLM's name): each rank holds its
    share of the attention heads, of the MLP and of every adapter; one engine core drives
    one process per rank. On CUDA one GPU each (cuda:0 on); on a CPU, processes sharing
    the cores (gloo; for tests)."""
    enforce_eager: bool = False
    """On CUDA, run every step eagerly instead of replaying captured decode graphs."""
    cpu_threads: int | None = None
    """Most threads of the forward pass on a CPU (torch and the native kernels). Default:
    one per core this process may use (its affinity, within a cgroup CPU quota); under
    `loraserve serve` on 4 or more cores, one per core less one, left to the HTTP front end.
    Each step runs on these or on one thread, whichever steps of its size measured cheaper
    (engine/runner/cpu_threads.py: threads stall one another when other processes share the
    CPU)."""

    def __post_init__(self) -> None:
        _check(
            self.dtype == "auto" or self.dtype in DTYPES,
            f"dtype must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}",
        )
        _check(
            self.kernel_backend in KERNEL_BACKENDS,
            f"kernel_backend must be one of {KERNEL_BACKENDS}, got {self.kernel_backend!r}",
        )
        _check(
            self.max_model_len is None or self.max_model_len >= 2,
            f"max_model_len must be >= 2, got {self.max_model_len}",
        )
        _check(
            self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"),
            f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )
        _check(
            self.tensor_parallel_size >= 1,
            f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}",
        )
        _check(
            self.cpu_threads is None or self.cpu_threads >= 1,
            f"cpu_threads must be >= 1, got {self.cpu_threads}",
        )
        names = self.served_model_name
        # One name (as the Python API takes it), or argparse's list of several.
        object.__setattr__(
            self, "served_model_name", (names,) if isinstance(names, str) else tuple(names)
        )
        _check(
            all(self.served_model_name),
            f"served_model_name must not be empty, got {self.served_model_name!r}",
        )

    def served_model_names(self) -> tuple[str, ...]:
        """The names /v1/models lists for the base model: as given, else the folder's name."""
        if self.served_model_name:
            return tuple(dict.fromkeys(self.served_model_name))
        return (Path(self.model).resolve().name,)


@dataclass(frozen=True)
class CacheConfig:
    """The unified page pool shared by the KV cache and resident adapters."""

    block_size: int = 16
    """Tokens per KV page."""
    pool_pages: int | None = None
    """Pages in the pool; overrides pool_memory_gib and gpu_memory_utilization."""
    pool_memory_gib: float | None = None
    """Pool size in GiB (default on CPU: 1 GiB; on CUDA: from gpu_memory_utilization)."""
    gpu_memory_utilization: float = 0.9
    """Fraction of the GPU's memory loraserve may use (weights, pool and activations)."""
    enable_prefix_caching: bool = field(default=True, metadata={"flag": "--prefix-caching"})
    """Keep the KV of full blocks after their requests end, keyed by adapter, and start
    new requests after the longest cached prefix of their prompt (reclaimed least
    recently used first, with idle adapters)."""

    def __post_init__(self) -> None:
        _check(
            self.block_size in (8, 16, 32, 64),
            f"block_size must be 8, 16, 32 or 64, got {self.block_size}",
        )
        _check(
            self.pool_pages is None or self.pool_pages >= 2,
            f"pool_pages must be >= 2, got {self.pool_pages}",
        )
        _check(
            self.pool_memory_gib is None or self.pool_memory_gib > 0,
            f"pool_memory_gib must be > 0, got {self.pool_memory_gib}",
        )
        _check(
            0 < self.gpu_memory_utilization <= 1,
            f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}",
        )


@dataclass(frozen=True)
class LoraConfig:
    """Limits on the adapters that can be registered and resident."""

    max_lora_rank: int = 64
    """Largest adapter rank accepted; sizes the pool's pages."""
    max_resident_adapters: int | None = None
    """Adapters that may hold pool pages at once (rows of the offset table), so the most
    distinct adapters one step can run; unset: max_num_seqs + RESIDENT_HEADROOM, enough for
    a batch whose every sequence names its own adapter beside pinned and prefetched ones."""
    max_cpu_loras: int | None = None
    """Adapters kept in host RAM once read from disk (least recently used dropped first;
    unlimited if unset). Adapters of unfinished requests are always kept."""
    max_cpu_lora_memory_gib: float | None = None
    """Host RAM the adapters read from disk may take, in GiB (least recently used
    dropped first; unlimited if unset)."""
    adapter_load_workers: int = 1
    """Threads that read adapter folders while the engine steps (0: read in the
    engine's own thread, pausing every request: a baseline for benchmarks)."""
    max_adapter_weight: float = 1e4
    """Largest entry of an adapter's A or scaled B accepted; past it the folder is refused as
    corrupt or absurd (e.g. lora_alpha 1e38). Trained adapters' entries stay within ~10."""

    def __post_init__(self) -> None:
        _check(
            1 <= self.max_lora_rank <= 512,
            f"max_lora_rank must be in 1..512, got {self.max_lora_rank}",
        )
        _check(
            self.max_resident_adapters is None or self.max_resident_adapters >= 1,
            f"max_resident_adapters must be >= 1, got {self.max_resident_adapters}",
        )
        _check(
            self.max_cpu_loras is None or self.max_cpu_loras >= 1,
            f"max_cpu_loras must be >= 1, got {self.max_cpu_loras}",
        )
        _check(
            self.max_cpu_lora_memory_gib is None or self.max_cpu_lora_memory_gib > 0,
            f"max_cpu_lora_memory_gib must be > 0, got {self.max_cpu_lora_memory_gib}",
        )
        _check(
            self.max_adapter_weight > 0,
            f"max_adapter_weight must be > 0, got {self.max_adapter_weight}",
        )
        _check(
            0 <= self.adapter_load_workers <= 64,
            f"adapter_load_workers must be in 0..64, got {self.adapter_load_workers}",
        )

    @property
    def max_cpu_lora_bytes(self) -> int | None:
        gib = self.max_cpu_lora_memory_gib
        return None if gib is None else int(gib * 2**30)


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine is built from."""

    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    @property
    def resident_adapter_slots(self) -> int:
        """`lora.max_resident_adapters`, or its default from the scheduler's batch limit."""
        chosen = self.lora.max_resident_adapters
        return self.scheduler.max_num_seqs + RESIDENT_HEADROOM if chosen is None else chosen


@dataclass(frozen=True)
class RuntimeInfo:
    """Values the engine finds at start-up (plain values: the front-end process reads them)."""

    device: str
    dtype: str
    kernel_backend: str
    """The kernels chosen (`kernel_backend` resolved: triton, native, torch or reference)."""
    num_pages: int
    page_numel: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    served_model_names: tuple[str, ...]
    """Every name of the base model in the API (`ModelConfig.served_model_names`)."""
    warmup_seconds: float = 0.0
    """The runner's start-up warm-up: decode graph captures and prefill compiles."""

    @property
    def served_model_name(self) -> str:
        """The base model's first name: the one responses and metrics say."""
        return self.served_model_names[0]


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, within its cgroup's CPU quota (a
    Kubernetes CPU limit of 2 on a 64-core node is 2: more threads only get paused)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = _cgroup_quota()
    return max(1, min(cores or 1, quota if quota is not None else cores or 1))


def _cgroup_quota() -> int | None:
    """The CPU quota in whole cores (rounded up), or None where none is set or readable."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as file:  # cgroup v2: "max 100000" or "200000 100000"
            quota, period = file.read().split()[:2]
        if quota == "max":
            return None
        return -(-int(quota) // int(period))
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as file:
            quota_us = int(file.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as file:
            period_us = int(file.read())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 else -(-quota_us // period_us)


def with_serving_threads(config: EngineConfig) -> EngineConfig:
    """`config` for an engine core beside an HTTP front end: unless `cpu_threads` is set,
    on 4 or more cores one is left to the front end (bench/results/README.md, issue 11:
    on 2 cores the engine on one thread served 0.56x as fast as on two, quiet, and
    3-5x faster while other processes loaded the machine)."""
    if config.model.cpu_threads is not None:
        return config
    cores = available_cores()
    model = dataclasses.replace(config.model, cpu_threads=cores - 1 if cores >= 4 else cores)
    return dataclasses.replace(config, model=model)


OPENMP_SPIN_COUNT = "100"
"""GOMP_SPINCOUNT of the engine-core process: busy-wait iterations of an OpenMP thread at
a barrier before it sleeps (libgomp's own value when it runs more threads than CPUs)."""


def serving_openmp_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """Variables for an engine-core process beside a front end: a short OpenMP busy-wait,
    unless `environ` (the user's) chooses one (GOMP_SPINCOUNT or OMP_WAIT_POLICY).

    libgomp (torch's OpenMP, which the native kernels share) reads them once, when torch is
    first imported, and otherwise spins 300,000 times at each barrier before sleeping, or
    100 times once it runs more threads than there are CPUs. An adapter read on a loader
    thread used to decide which: its torch calls start a second OpenMP team, so a server
    that read adapters from disk ran with 100 spins, and one whose adapters were all pinned
    (read at start, on the main thread) spun 300,000 times while its own team and the front
    end wanted the same cores: pinning cost ~40% of throughput (issue 27). Now every engine
    core spins briefly, whatever it reads, and pinned runs as unpinned."""
    if "GOMP_SPINCOUNT" in environ or "OMP_WAIT_POLICY" in environ:
        return {}
    return {"GOMP_SPINCOUNT": OPENMP_SPIN_COUNT}


def resolve_max_model_len(arch: ModelArch, requested: int | None) -> int:
    """The context limit: as asked, within the model's positions (sliding windows do not
    limit it: the attention kernels implement them)."""
    limit = arch.max_position_embeddings
    if requested is not None and requested > limit:
        raise ValueError(f"max_model_len={requested} is above the model's limit of {limit} tokens")
    return requested or limit


def build_config(model: str, **options: Any) -> EngineConfig:
    """An EngineConfig from flat keyword options, each routed to the part that owns it.
    A Hugging Face repo id (`org/name`) is resolved to its cached snapshot (models/hub.py),
    downloaded first if need be, and named by the id unless `served_model_name` says."""
    if is_repo_id(model):
        options.setdefault("served_model_name", (model,))
        model = resolve_model(model)
    parts: dict[str, Any] = {}
    for name, cls in (("cache", CacheConfig), ("lora", LoraConfig), ("scheduler", SchedulerConfig)):
        fields = {f.name for f in dataclasses.fields(cls)}
        parts[name] = cls(**{k: options.pop(k) for k in list(options) if k in fields})
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(options) - model_fields)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}")
    return EngineConfig(model=ModelConfig(model=model, **options), **parts)
