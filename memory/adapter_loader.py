"""Reading adapter folders off the engine thread.

The engine core asks for an adapter it does not hold in host RAM (`submit`); a small
pool of threads reads the folder, checks it and converts it to the pool's layout
(memory/adapter_store.py) while the engine keeps stepping; the engine thread collects
what finished between two steps (`poll`). Reading is mostly file I/O, safetensors
parsing and torch conversions, which let go of the GIL, so the steps go on beside it.

With `num_workers=0` the read happens inside `submit`, on the caller's thread: the
engine waits for it. That is the baseline the benchmarks compare overlap against,
and what deterministic tests use.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from loraserve.errors import AdapterError
from loraserve.memory.adapter_store import AdapterReader, HostAdapter


def _set_torch_threads(threads: int | None) -> None:
    """A worker thread's first act. torch's thread count is the calling thread's (OpenMP's
    per-thread setting); torch also keeps the value for threads that start using torch
    later, and the engine thread, which sets its own each step, started long before."""
    if threads is not None:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class LoadResult:
    """One finished read: the adapter, or why its folder was refused."""

    name: str
    path: Path
    host: HostAdapter | None
    error: AdapterError | None
    seconds: float
    """Time from the start of the read to its end (not counting the wait for a thread)."""


class AdapterLoader:
    """Reads folders on `num_workers` threads; results come back through `poll`."""

    def __init__(
        self, reader: AdapterReader, num_workers: int, torch_threads: int | None = None
    ) -> None:
        """`torch_threads`: threads of each worker's torch ops (None: torch's default). An
        engine computing on the CPU reads on one, so that a read beside a step does not
        start a second team of threads on the cores the step's team runs on."""
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.reader = reader
        self._done: queue.SimpleQueue[LoadResult] = queue.SimpleQueue()
        self._finished = threading.Event()  # set when a result is waiting in _done
        self.num_in_flight = 0
        """Reads submitted and not yet collected by `poll` (engine thread only)."""
        self._pool = (
            ThreadPoolExecutor(
                num_workers,
                thread_name_prefix="loraserve-adapter-loader",
                initializer=_set_torch_threads,
                initargs=(torch_threads,),
            )
            if num_workers
            else None
        )

    def submit(self, name: str, path: Path) -> None:
        """Start reading `path` as adapter `name` (or read it now, without workers)."""
        self.num_in_flight += 1
        if self._pool is None:
            self._put(self.read(name, path))
        else:
            self._pool.submit(lambda: self._put(self.read(name, path)))

    def poll(self) -> list[LoadResult]:
        """Reads finished since the last call, in the order they finished."""
        if not self.num_in_flight:
            return []  # every step asks; most steps nothing is being read
        self._finished.clear()
        results = []
        while True:
            try:
                results.append(self._done.get_nowait())
            except queue.Empty:
                self.num_in_flight -= len(results)
                return results

    def wait(self, timeout: float) -> bool:
        """Block until a read has finished (or `timeout` seconds); False on timeout."""
        return self._finished.wait(timeout)

    def _put(self, result: LoadResult) -> None:
        self._done.put(result)
        self._finished.set()

    def read(self, name: str, path: Path) -> LoadResult:
        """Read `path` as adapter `name` on the calling thread."""
        started = time.perf_counter()
        try:
            host = self.reader.read(name, path)
        except AdapterError as error:
            return LoadResult(name, path, None, error, time.perf_counter() - started)
        except Exception as error:  # an unreadable file (permissions, I/O): the folder's fault
            refused = AdapterError(f"adapter folder '{path}': cannot be read ({error})")
            return LoadResult(name, path, None, refused, time.perf_counter() - started)
        return LoadResult(name, path, host, None, time.perf_counter() - started)
