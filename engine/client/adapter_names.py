"""The front end's view of which adapters exist: registered ones and the adapter dir's.

The engine core owns what is loaded where (engine/core/adapter_manager.py); the front end
only needs names and folders, to refuse unknown models (404), to list `/v1/models`,
and to tell the core where an adapter it has not seen yet lives. Two sources:
adapters registered at start (`--adapter`, `--pin-adapter`) or by the load route, and
the listing of `--adapter-dir` (memory/adapter_dir.py: rescanned when the folder
changes, one stat for a name not listed yet). A registered name wins over a listed one.

Pure Python, no torch: the front-end process uses it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

from loraserve.memory.adapter_dir import AdapterDirectory


def adapters_read_at_start(
    adapters: Mapping[str, str | Path], pinned: Collection[str], listed: Mapping[str, Path]
) -> dict[str, tuple[str, bool]]:
    """name -> (folder, pinned) of the adapters the core reads at start: those given, and
    the pinned ones of the adapter dir's listing. ValueError for a name given twice or a
    pin of nothing."""
    clashes = sorted(adapters.keys() & listed.keys())
    if clashes:
        raise ValueError(f"adapter name {clashes[0]!r} is given twice")
    unknown = sorted(set(pinned) - adapters.keys() - listed.keys())
    if unknown:
        raise ValueError(
            f"--pin-adapter {unknown[0]}: no such adapter (--adapter or --adapter-dir)"
        )
    chosen = {name: Path(path) for name, path in adapters.items()}
    chosen.update({name: listed[name] for name in pinned if name not in chosen})
    return {name: (str(path), name in pinned) for name, path in chosen.items()}


class AdapterNames:
    """Registered adapters and the adapter dir's, name -> folder."""

    def __init__(self, adapter_dir: str | Path | None = None) -> None:
        self.directory = None if adapter_dir is None else AdapterDirectory(adapter_dir)
        self.registered: dict[str, Path] = {}

    def listed(self) -> dict[str, Path]:
        """The adapter dir's folders, by name (empty without an adapter dir)."""
        return {} if self.directory is None else self.directory.listing()

    def all(self) -> dict[str, Path]:
        """Every adapter served (a new dict)."""
        return {**self.listed(), **self.registered}

    def folder(self, name: str) -> Path | None:
        """The folder of adapter `name`: registered, or found in the adapter dir (even one
        copied in since the last listing); None if there is none."""
        registered = self.registered.get(name)
        if registered is not None or self.directory is None:
            return registered
        return self.directory.resolve(name)
