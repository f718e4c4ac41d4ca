"""Tensor parallelism: one engine core, one runner per rank, each rank its own device.

The engine core (scheduler, page accounting, prefix cache, adapter catalog) stays one
process. Rank 0's runner lives in it (`TensorParallelRunner`): it keeps every request's
sampling state (grammars, seeded generators, penalties) where the core advances them, and
samples from the whole logits. Ranks 1..N-1 are worker processes (`python -P -m
loraserve.engine.runner.tp_worker`), each a `TorchModelRunner` of its shard. Each step,
rank 0 pickles what the other ranks need (`ShardStep`: the chunks, each with its own tokens
and block table, and the prompt-logprob rows) once and sends the same bytes to every
worker, then each worker its adapter copies (only its own slabs of each adapter); every
rank then runs its copies and forward pass, and the collectives inside the forward pass
keep the ranks in step. Ranks never decide anything: they cannot disagree about what runs.

    core process                      worker 1 .. N-1
    scheduler -> Step                 recv ShardStep
    rank 0: send ShardStep ------->   copies, forward (its shard)
            copies, forward  <== all-reduce / all-gather ==>
            sample (whole logits)

A rank that dies ends the engine: the watchdog thread sees the process exit, stops the
other ranks (so that a collective waiting for the dead one fails instead of hanging), and
`check` / `execute` raise from then on; in the engine-core process that is a fatal step
(the front end answers 503 and fails what is in flight). A rank that never returns from a
collective (NCCL) gets `STUCK_STEP_S`, then the process exits.

The workers are started with `subprocess` (the engine-core process is a daemon, which
`multiprocessing` forbids to have children) and speak over a `multiprocessing.connection`
socket on 127.0.0.1 with a random key; each exits when that socket closes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import secrets
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from loraserve.engine.core.config import EngineConfig, available_cores
from loraserve.engine.core.request import ShardChunk, ShardStep, Step
from loraserve.engine.runner.collectives import RankCollectives, host_store
from loraserve.engine.runner.runner import TorchModelRunner, resolve_device
from loraserve.engine.sampling.sampler import SamplerOutput
from loraserve.errors import EngineError
from loraserve.memory.geometry import PoolGeometry
from loraserve.memory.residency import AdapterLoad
from loraserve.models.arch import ModelArch
from loraserve.models.hf_config import model_folder
from loraserve.models.tensor_parallel import Shard, check_divisible, checkpoint_name
from loraserve.models.weights import checkpoint_files
from loraserve.scheduler.scheduler import ScheduledChunk

logger = logging.getLogger(__name__)

AUTHKEY_VARIABLE = "LORASERVE_TP_AUTHKEY"
WATCH_INTERVAL_S = 0.2
STUCK_STEP_S = 30.0
"""After a rank died, how long a step may still wait in a collective before the process exits."""
STARTUP_TIMEOUT_S = 600.0
PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL


def rank_devices(device: str, size: int) -> list[torch.device]:
    """One device per rank: `cuda:0` .. `cuda:N-1` (from `cuda:K` on, when given one), or
    the CPU for all. ValueError when there are too few GPUs."""
    first = resolve_device(device)
    if first.type != "cuda":
        return [first] * size
    start = first.index or 0
    if start + size > torch.cuda.device_count():
        raise ValueError(
            f"tensor_parallel_size {size} needs {size} CUDA devices from cuda:{start}; "
            f"{torch.cuda.device_count()} are visible"
        )
    return [torch.device("cuda", start + rank) for rank in range(size)]


def rank_config(config: EngineConfig, size: int, device: torch.device) -> EngineConfig:
    """A rank's configuration: its device, and on a CPU its share of the cores."""
    model = config.model
    threads = model.cpu_threads
    if device.type == "cpu":
        threads = max(1, (threads or available_cores()) // size)
    model = dataclasses.replace(model, device=str(device), cpu_threads=threads)
    return dataclasses.replace(config, model=model)


class CheckpointWeights:
    """memory.dora.BaseWeights read from the checkpoint (no rank holds a whole weight)."""

    def __init__(self, folder: str, dtype: torch.dtype) -> None:
        self.files = checkpoint_files(model_folder(folder))
        self.dtype = dtype

    def base_weight(self, layer: int, module: str) -> torch.Tensor:
        name = checkpoint_name(layer, module)
        with safe_open(str(self.files[name]), framework="pt") as handle:
            return handle.get_tensor(name).to(self.dtype)


class TensorParallelRunner(TorchModelRunner):
    """Rank 0 of `config.model.tensor_parallel_size` ranks, and the keeper of the others."""

    def __init__(
        self,
        config: EngineConfig,
        arch: ModelArch,
        geometry: PoolGeometry,
        eos_token_ids: tuple[int, ...],
    ) -> None:
        size = config.model.tensor_parallel_size
        check_divisible(arch, size)
        devices = rank_devices(config.model.device, size)
        self.failure: str | None = None
        self._step_started: float | None = None
        self.processes: list[subprocess.Popen[bytes]] = []
        self.connections: list[Connection] = []
        authkey = secrets.token_bytes(32)
        self.listener = Listener(("127.0.0.1", 0), authkey=authkey)
        self._closed = threading.Event()
        self._finalizer = weakref.finalize(
            self, _stop_workers, self._closed, self.listener, self.connections, self.processes
        )
        self.store = host_store(size)
        try:
            for rank in range(1, size):
                self.processes.append(_start_worker(self.listener.address, authkey))
                connection = self._accept(rank)
                connection.send(
                    (rank_config(config, size, devices[rank]), arch, geometry, eos_token_ids)
                )
                connection.send((Shard(rank, size), self.store.port))
                self.connections.append(connection)
            collectives = self._join_group(Shard(0, size), devices[0])
            super().__init__(
                rank_config(config, size, devices[0]), arch, geometry, eos_token_ids, collectives
            )
            for rank, connection in enumerate(self.connections, start=1):
                self._wait_ready(rank, connection)
        except BaseException:
            self.close()
            raise
        self.base_weights = CheckpointWeights(config.model.model, self.dtype)
        logger.info(
            "tensor parallelism: %d ranks on %s, %s; eager (no CUDA graphs under it yet)",
            size, ", ".join(str(device) for device in devices), collectives.group.name(),
        )  # fmt: skip
        self._watchdog = threading.Thread(  # holding no reference to the runner
            target=_watch,
            args=(weakref.ref(self), self.processes, self._closed),
            name="loraserve-tp-watchdog",
            daemon=True,
        )
        self._watchdog.start()

    # -- start-up ----------------------------------------------------------------------------

    def _accept(self, rank: int) -> Connection:
        """The connection of the worker just started (its process watched meanwhile)."""
        result: list[Connection] = []
        thread = threading.Thread(target=lambda: result.append(self.listener.accept()))
        thread.daemon = True
        thread.start()
        self._wait_while_alive(thread, f"rank {rank} did not connect")
        return result[0]

    def _join_group(self, shard: Shard, device: torch.device) -> RankCollectives:
        """Rank 0's process group, once every worker has joined it."""
        result: list[RankCollectives] = []
        thread = threading.Thread(
            target=lambda: result.append(RankCollectives(self.store, shard, device))
        )
        thread.daemon = True
        thread.start()
        self._wait_while_alive(thread, "the ranks did not form their group")
        if not result:
            raise EngineError("the tensor-parallel group could not be formed (see the log)")
        return result[0]

    def _wait_while_alive(self, thread: threading.Thread, what: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while thread.is_alive():
            thread.join(WATCH_INTERVAL_S)
            self._raise_if_a_worker_exited()
            if time.monotonic() > deadline:
                raise EngineError(f"tensor parallelism: {what} in {STARTUP_TIMEOUT_S:.0f} s")

    def _wait_ready(self, rank: int, connection: Connection) -> None:
        while not connection.poll(WATCH_INTERVAL_S):
            self._raise_if_a_worker_exited()
        message = connection.recv()
        if message != "ready":
            raise EngineError(f"tensor-parallel rank {rank} failed to start: {message}")

    def _raise_if_a_worker_exited(self) -> None:
        for rank, process in enumerate(self.processes, start=1):
            code = process.poll()
            if code is not None:
                raise EngineError(
                    f"tensor-parallel rank {rank} exited during start-up (exit code {code}; "
                    "its error is in the log above)"
                )

    # -- steps -------------------------------------------------------------------------------

    def execute(self, step: Step) -> SamplerOutput:
        self.check()
        self._step_started = time.monotonic()
        try:
            return super().execute(step)
        except Exception as error:
            self._find_dead_worker()  # a collective broken by a dead rank says so
            if self.failure is not None:
                raise EngineError(self.failure) from error
            raise
        finally:
            self._step_started = None

    def _share(
        self, chunks: list[ScheduledChunk], loads: list[AdapterLoad], extra_logits: list[int]
    ) -> None:
        """Two messages to each worker: the step without its copies (its chunks' own tokens
        and tables, pickled once, the same bytes for all), then its copies with only that
        rank's slabs of each adapter."""
        step = ShardStep([ShardChunk.of(chunk) for chunk in chunks], extra_logits)
        common = pickle.dumps(step, PICKLE_PROTOCOL)
        for rank, connection in enumerate(self.connections, start=1):
            rank_loads = [
                dataclasses.replace(load, adapter=load.adapter.rank_slabs(rank)) for load in loads
            ]
            connection.send_bytes(common)
            connection.send_bytes(pickle.dumps(rank_loads, PICKLE_PROTOCOL))

    def check(self) -> None:
        if self.failure is not None:
            raise EngineError(self.failure)

    def base_weight(self, layer: int, module: str) -> torch.Tensor:
        return self.base_weights.base_weight(layer, module)

    # -- failure and shutdown ----------------------------------------------------------------

    def _find_dead_worker(self) -> None:
        """After a failed step: a worker that has exited (or does within a second) is the cause."""
        deadline = time.monotonic() + 1.0
        while self.failure is None and time.monotonic() < deadline:
            for rank, process in enumerate(self.processes, start=1):
                if process.poll() is not None:
                    self._stop(f"tensor-parallel rank {rank} exited (exit code {process.poll()})")
                    return
            time.sleep(0.05)

    def _stop(self, reason: str) -> None:
        """The engine is over: record why, and stop every other rank (a collective waiting
        for the dead one fails rather than hangs)."""
        if self.failure is None:
            self.failure = f"{reason}: the engine stops"
            logger.error("%s", self.failure)
        for process in self.processes:
            if process.poll() is None:
                process.kill()

    def _fail(self, reason: str) -> None:
        """The watchdog's: `_stop`, then give the step in flight `STUCK_STEP_S` to return."""
        self._stop(reason)
        deadline = time.monotonic() + STUCK_STEP_S
        while self._step_started is not None and time.monotonic() < deadline:
            time.sleep(WATCH_INTERVAL_S)
        if self._step_started is not None:
            logger.critical("a step is stuck in a collective after a rank died; exiting")
            os._exit(1)

    def close(self) -> None:
        """Stop the workers (idempotent; also when the runner is collected, or at exit)."""
        self._finalizer()


def _watch(
    runner: weakref.ref[TensorParallelRunner],
    processes: list[subprocess.Popen[bytes]],
    closed: threading.Event,
) -> None:
    """Until the runner is closed: a worker that exits ends the engine (the module docstring)."""
    while not closed.wait(WATCH_INTERVAL_S):
        for rank, process in enumerate(processes, start=1):
            code = process.poll()
            alive = runner()
            if code is not None and alive is not None and not closed.is_set():
                alive._fail(f"tensor-parallel rank {rank} exited (exit code {code})")
                return


def _stop_workers(
    closed: threading.Event,
    listener: Listener,
    connections: list[Connection],
    processes: list[subprocess.Popen[bytes]],
) -> None:
    """Close the connections (each worker exits), wait for the workers, kill any that lingers."""
    closed.set()
    for connection in connections:
        with contextlib.suppress(OSError):
            connection.close()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
    listener.close()


def _start_worker(address: Any, authkey: bytes) -> subprocess.Popen[bytes]:
    """A worker process, its import path free of the current folder (`-P`)."""
    host, port = address
    environment = {**os.environ, AUTHKEY_VARIABLE: authkey.hex()}
    command = [sys.executable, "-P", "-m", "loraserve.engine.runner.tp_worker", host, str(port)]
    return subprocess.Popen(command, env=environment, cwd=Path.cwd())
