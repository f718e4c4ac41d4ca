"""Every adapter the engine knows, and whether its weights are in host RAM.

Three tiers hold an adapter's weights (docs/architecture.md): its folder on disk, host RAM (this
catalog), the pool (memory/pool.py). Registering an adapter records its folder and
reads nothing; the first request that names it starts a read in the loader's threads
(`request`), and the engine collects finished reads between steps (`poll`). A
registration that must succeed or fail at once (start-up, `LLM`) reads synchronously
(`read_now`).

Host RAM is a budget (`max_cpu_loras` adapters and/or `max_cpu_bytes`): after each
read, the least recently used adapters are dropped from host RAM until the budget
holds. An adapter that an unfinished request names (`set_in_use`) is never dropped: its
request needs the host copy to be brought into the pool. So the budget bounds idle
adapters; with more distinct adapters in flight than it allows, host RAM holds those
too until their requests finish. The idle ones are kept apart, least recently used first
(one whose last request just ended counts as just used), and fitting the budget looks at
those alone: with a thousand adapters named by waiting requests, every request's end would
otherwise scan them all. An adapter dropped from host RAM stays registered
and is read again from its folder when next needed.

A folder that fails to read is remembered: later requests for it fail at once with
the same error, without reading, until one of its files changes (the signature:
mtime and size of the folder's adapter_config.json and adapter_model.safetensors);
the next request after such a change reads it again.

Pure bookkeeping on the engine thread: only `AdapterLoader`'s threads touch files
concurrently, and they hand results back through `poll`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from loraserve.errors import AdapterError, UnknownAdapterError
from loraserve.memory.adapter_dir import CONFIG_FILE
from loraserve.memory.adapter_loader import AdapterLoader, LoadResult
from loraserve.memory.adapter_store import AdapterReader, HostAdapter, check_adapter_name
from loraserve.memory.latency_log import LatencyLog
from loraserve.memory.peft_config import SAFETENSORS_FILE

Signature = tuple[tuple[int, int] | None, ...]
"""(mtime_ns, size) of each file that makes an adapter, None for a missing one."""


def folder_signature(folder: Path) -> Signature:
    """What changes when an adapter folder's files are replaced or edited."""
    stats: list[tuple[int, int] | None] = []
    for name in (CONFIG_FILE, SAFETENSORS_FILE):
        try:
            stat = os.stat(folder / name)
        except OSError:
            stats.append(None)
        else:
            stats.append((stat.st_mtime_ns, stat.st_size))
    return tuple(stats)


@dataclass
class _Entry:
    name: str
    path: Path
    loading: bool = False
    failure: AdapterError | None = None
    failed_signature: Signature | None = None
    num_pages: int | None = None
    """Known once read: pages the adapter takes in the pool."""
    max_rank: int | None = None


class AdapterCatalog:
    """Registered adapters (name -> folder) and the host-RAM tier, least recent first."""

    def __init__(
        self,
        loader: AdapterLoader,
        max_cpu_loras: int | None = None,
        max_cpu_bytes: int | None = None,
    ) -> None:
        self.loader = loader
        self.max_cpu_loras = max_cpu_loras
        self.max_cpu_bytes = max_cpu_bytes
        self._entries: dict[str, _Entry] = {}
        self._host: OrderedDict[str, HostAdapter] = OrderedDict()  # least recently used first
        self._in_use: set[str] = set()
        """Adapters an unfinished request names: the engine core's count of them
        (`AdapterManager.users`) says when one starts or stops being (`set_in_use`)."""
        self._idle: OrderedDict[str, None] = OrderedDict()
        """The host adapters not in use, least recently used first: what the budget drops."""
        self._host_bytes = 0
        self.load_seconds = LatencyLog()
        """Durations of reads from disk not yet taken by `drain_load_seconds`."""

    @property
    def reader(self) -> AdapterReader:
        return self.loader.reader

    # -- registration ----------------------------------------------------------------------

    def register(self, name: str, path: str | Path) -> None:
        """Know adapter `name` by its folder; nothing is read. AdapterError if the name is
        taken or unusable."""
        check_adapter_name(name)
        if name in self._entries:
            raise AdapterError(f"adapter {name!r} is already registered")
        self._entries[name] = _Entry(name, Path(path))

    def unregister(self, name: str) -> None:
        """Forget an adapter and drop its host copy (a read in progress is discarded)."""
        self._entry(name)
        del self._entries[name]
        self._drop_host(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    # -- reading -------------------------------------------------------------------------

    def read_now(self, name: str) -> HostAdapter:
        """Read `name` on this thread (unless in host RAM); AdapterError if refused."""
        if name in self._host:
            return self.host(name)
        entry = self._entry(name)
        result = self.loader.read(name, entry.path)
        self._record(result)
        if result.error is not None:
            raise result.error
        self._fit_budget(keep={name})
        return self.host(name)

    def request(self, name: str) -> None:
        """Make sure `name` is in host RAM or being read. AdapterError at once if its folder
        failed before and has not changed since."""
        entry = self._entry(name)
        if name in self._host or entry.loading:
            return
        if entry.failure is not None:
            if folder_signature(entry.path) == entry.failed_signature:
                raise entry.failure
            entry.failure = entry.failed_signature = None  # changed: read it again
        entry.loading = True
        self.loader.submit(name, entry.path)

    def poll(self) -> list[LoadResult]:
        """Record the reads that finished (into host RAM, or remembered as failed); returns
        them, for the engine to act on (start waiting requests, or fail them)."""
        results = [result for result in self.loader.poll() if self._record(result)]
        self._fit_budget(keep={result.name for result in results})
        return results

    def is_loading(self, name: str) -> bool:
        entry = self._entries.get(name)
        return entry is not None and entry.loading

    # -- host RAM ------------------------------------------------------------------------

    def in_host(self, name: str | None) -> bool:
        return name in self._host

    def host(self, name: str) -> HostAdapter:
        """The host copy of `name` (it must be in host RAM: `in_host`)."""
        host = self._host.get(name)
        if host is None:
            raise UnknownAdapterError(f"adapter {name!r} is not in host RAM")
        return host

    def touch(self, name: str) -> None:
        """Mark `name` as just used (it is dropped from host RAM last)."""
        if name in self._host:
            self._host.move_to_end(name)
            if name in self._idle:
                self._idle.move_to_end(name)

    def set_in_use(self, name: str, in_use: bool) -> None:
        """An unfinished request names `name` now (it is never dropped), or none does any more
        (it becomes the most recently used idle adapter; `fit_budget` may drop it later)."""
        if in_use:
            self._in_use.add(name)
            self._idle.pop(name, None)
        else:
            self._in_use.discard(name)
            if name in self._host:
                self._idle[name] = None

    def host_adapters(self) -> list[str]:
        """Adapters in host RAM, least recently used first."""
        return list(self._host)

    def num_pages(self, name: str) -> int:
        """Pages `name` takes in the pool: exact once read, else the largest an adapter may take."""
        pages = self._entry(name).num_pages
        return self.reader.max_num_pages if pages is None else pages

    def max_rank(self, name: str) -> int | None:
        """The adapter's largest rank, once read."""
        return self._entry(name).max_rank

    def fit_budget(self) -> None:
        """Drop idle adapters from host RAM, least recently used first, until within budget:
        after a read, and when an adapter's last request ends (it was kept while in use)."""
        self._fit_budget(keep=set())

    def drain_load_seconds(self) -> list[float]:
        return self.load_seconds.drain()

    # -- internals -----------------------------------------------------------------------

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownAdapterError(f"adapter {name!r} is not registered")
        return entry

    def _record(self, result: LoadResult) -> bool:
        """Apply a finished read to its entry; False if the entry is gone or was replaced."""
        entry = self._entries.get(result.name)
        if entry is None or entry.path != result.path:
            return False
        entry.loading = False
        self.load_seconds.record(result.seconds)
        if result.error is not None:
            entry.failure, entry.failed_signature = result.error, folder_signature(entry.path)
            return True
        assert result.host is not None
        entry.num_pages, entry.max_rank = result.host.num_pages, result.host.max_rank
        self._drop_host(result.name)
        self._host[result.name] = result.host
        self._host_bytes += result.host.num_bytes
        if result.name not in self._in_use:
            self._idle[result.name] = None
        return True

    def _drop_host(self, name: str) -> None:
        host = self._host.pop(name, None)
        if host is not None:
            self._host_bytes -= host.num_bytes
            self._idle.pop(name, None)

    def _over_budget(self) -> bool:
        count, limit_bytes = len(self._host), self.max_cpu_bytes
        return (self.max_cpu_loras is not None and count > self.max_cpu_loras) or (
            limit_bytes is not None and self._host_bytes > limit_bytes
        )

    def _fit_budget(self, keep: set[str]) -> None:
        """Drop idle adapters (but those just read, `keep`) from host RAM, least recently
        used first, until within budget."""
        if not self._over_budget():
            return
        for name in [name for name in self._idle if name not in keep]:
            self._drop_host(name)
            if not self._over_budget():
                return
