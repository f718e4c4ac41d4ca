"""The engine core's side of adapters: registration, reads from disk, pins, who waits for what.

Registered adapters and their host copies are the catalog's (memory/adapter_catalog.py),
pool residency is the pool's (memory/pool.py); this class joins them for the core:

- a request names an adapter: `ensure` registers it if the front end found its folder
  on disk, and starts reading it unless it is in host RAM or the pool (the scheduler
  skips the request until then); `hold` / `release` count the unfinished requests of
  each adapter, which the host tier never drops;
- between steps, `collect` takes the reads that finished: waiters are told (a
  deferred answer to the front end), and the adapters whose folders were refused are
  returned, for the core to fail their requests;
- when the pool reclaims an adapter whose requests still wait and whose host copy is
  gone, it is read again from disk.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loraserve.errors import AdapterError, InvalidRequestError, UnknownAdapterError
from loraserve.memory.adapter_catalog import AdapterCatalog
from loraserve.memory.pool import UnifiedPool

Waiter = Callable[[Exception | None], None]
"""Told once an adapter is ready (None) or could not be had (the error)."""


@dataclass(frozen=True)
class Residency:
    """Where one adapter's weights are, for the metrics."""

    name: str
    level: str
    """`gpu`: resident in the pool (on whatever device); `cpu`: in host RAM only."""
    pinned: bool
    rank: int


class AdapterManager:
    """Registered adapters, their reads from disk, and the requests that wait for them."""

    def __init__(self, catalog: AdapterCatalog, pool: UnifiedPool) -> None:
        self.catalog, self.pool = catalog, pool
        self.users: Counter[str] = Counter()
        """Unfinished requests per adapter."""
        self.retiring: set[str] = set()
        """Adapters being unloaded: refused to new requests, forgotten once their last ends."""
        self._waiters: dict[str, list[Waiter]] = {}
        self._pin_when_read: dict[str, bool] = {}  # registrations waiting for their read
        self._refused: list[tuple[str, AdapterError]] = []
        pool.on_evict = self._on_evict

    # -- registration --------------------------------------------------------------------

    def register(
        self, name: str, path: str | Path, pinned: bool = False, wait: bool = True
    ) -> None:
        """Register and read a PEFT folder (pinned: kept resident in the pool). With `wait`,
        read it now (AdapterError if refused: nothing registered); without, read it in the
        background and tell `when_ready`'s waiters (a refused folder is unregistered).
        Refused while an adapter of that name is being unloaded."""
        if name in self.retiring:
            raise InvalidRequestError(
                f"adapter {name!r} is being unloaded once its requests finish; load it again then",
                "lora_name",
            )
        self.catalog.register(name, path)
        if not wait:
            self._pin_when_read[name] = pinned
            self._start_read(name)
            return
        try:
            self.catalog.read_now(name)
            if pinned:
                self._pin(name)
        except BaseException:
            self.catalog.unregister(name)
            raise

    def unregister(self, name: str) -> None:
        """Forget an adapter. With requests in flight, new requests for it are refused at
        once and it is forgotten when the last of them ends (refuse new, then unload)."""
        if name not in self.catalog or name in self.retiring:
            raise UnknownAdapterError(f"adapter {name!r} is not registered")
        self.retiring.add(name)
        self._retire_if_idle(name)

    def _retire_if_idle(self, name: str) -> None:
        if name not in self.retiring or self.users[name] or self.pool.is_in_use(name):
            return
        self.retiring.discard(name)
        self.pool.evict_if_idle(name)
        self.catalog.unregister(name)
        self._pin_when_read.pop(name, None)
        self._tell(name, UnknownAdapterError(f"adapter {name!r} was unloaded"))

    # -- requests ------------------------------------------------------------------------

    def ensure(self, name: str, path: str | None) -> None:
        """Make `name` usable by a new request: registered (from `path`, the folder the
        front end found, if unknown) and in host RAM, the pool, or on its way.
        UnknownAdapterError, or AdapterError for a folder remembered as refused."""
        if name in self.retiring:
            raise UnknownAdapterError(f"adapter {name!r} is not registered")
        if name not in self.catalog:
            if path is None:
                raise UnknownAdapterError(f"adapter {name!r} is not registered")
            self.catalog.register(name, path)
        if not self.pool.is_resident(name):
            self.catalog.request(name)

    def hold(self, name: str | None) -> None:
        if name is not None:
            if not self.users[name]:
                self.catalog.set_in_use(name, True)  # its host copy is kept
            self.users[name] += 1

    def release(self, name: str | None) -> None:
        """One request of `name` ended (an adapter being unloaded goes with its last)."""
        if name is not None:
            self.users[name] -= 1
            if not self.users[name]:
                del self.users[name]
                self.catalog.set_in_use(name, False)
                self._retire_if_idle(name)
                self.catalog.fit_budget()  # it may have been kept in host RAM past the budget

    def is_ready(self, name: str | None) -> bool:
        return self.pool.adapter_ready(name)

    def when_ready(self, name: str, waiter: Waiter) -> bool:
        """True if `name` is ready now; else `waiter` is told when it is (or fails)."""
        if self.is_ready(name) and name not in self._pin_when_read:
            return True
        self._waiters.setdefault(name, []).append(waiter)
        return False

    def num_pages(self, name: str) -> int:
        """Pages `name` takes in the pool (the largest possible until it is read)."""
        return self.catalog.num_pages(name)

    # -- between steps -------------------------------------------------------------------

    def collect(self) -> list[tuple[str, AdapterError]]:
        """Take finished reads; returns the adapters refused since the last call, whose
        requests the core fails."""
        for result in self.catalog.poll():
            name = result.name
            if result.error is not None:
                self._refused.append((name, result.error))
                if self._pin_when_read.pop(name, None) is not None:
                    self.catalog.unregister(name)  # a refused registration leaves no trace
                self._tell(name, result.error)
                continue
            self._tell(name, self._finish_registration(name))
        refused, self._refused = self._refused, []
        return refused

    def residency(self) -> list[Residency]:
        """Every adapter in the pool (`gpu`) or only in host RAM (`cpu`), by name."""
        pinned = set(self.pool.pinned_adapters())
        found = []
        for name in self.pool.resident_adapters():
            found.append(Residency(name, "gpu", name in pinned, self._rank(name)))
        resident = set(self.pool.resident_adapters())
        for name in self.catalog.host_adapters():
            if name not in resident:
                found.append(Residency(name, "cpu", False, self._rank(name)))
        return sorted(found, key=lambda residency: residency.name)

    # -- internals -----------------------------------------------------------------------

    def _start_read(self, name: str) -> None:
        try:
            self.catalog.request(name)
        except AdapterError as error:  # remembered as refused: fail it at the next step
            self._refused.append((name, error))

    def _finish_registration(self, name: str) -> AdapterError | None:
        """Pin a just-read adapter if its registration asked; the error if it cannot be."""
        if not self._pin_when_read.pop(name, False):
            return None
        try:
            self._pin(name)
        except AdapterError as error:
            self.catalog.unregister(name)
            return error
        return None

    def _pin(self, name: str) -> None:
        try:
            self.pool.pin_adapter(name)
        except MemoryError as error:
            raise AdapterError(f"adapter {name!r} cannot be pinned: {error}") from None

    def _on_evict(self, name: str) -> None:
        """The pool reclaimed `name`: read it again if requests still wait for it."""
        if self.users[name] and name in self.catalog and not self.catalog.in_host(name):
            self._start_read(name)

    def _tell(self, name: str, error: Exception | None) -> None:
        for waiter in self._waiters.pop(name, []):
            waiter(error)

    def _rank(self, name: str) -> int:
        return self.catalog.max_rank(name) or 0
