"""The disk tier's listing: a folder of PEFT adapter folders, each served under its name.

`--adapter-dir DIR` may hold thousands of adapters. They are *listed* (names and
folders, nothing read) when the server starts, again whenever the folder's mtime
changes (a folder added or removed), and looked up one by one when a request names an
adapter that is not in the listing yet (`resolve`: one stat, so a folder copied in a
moment ago is served without waiting for a rescan). The engine reads an adapter only
when a request first uses it (memory/adapter_catalog.py).

Pure Python, no torch: the front-end process uses it.
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_FILE = "adapter_config.json"
"""What makes a folder an adapter folder (PEFT writes it beside the weights)."""


def is_servable_name(name: str) -> bool:
    """Whether loraserve can serve an adapter under `name`: non-empty, without whitespace
    or ',' (names end up in comma-joined metric labels)."""
    return bool(name) and "," not in name and not any(char.isspace() for char in name)


def is_adapter_name(name: str) -> bool:
    """Whether `name` can be an adapter folder directly under the adapter dir: servable,
    and no path tricks."""
    return (
        is_servable_name(name) and name not in (".", "..") and "/" not in name and "\0" not in name
    )


def list_adapter_folders(root: str | Path) -> dict[str, Path]:
    """Every adapter folder directly under `root`, by name, sorted; ValueError if `root`
    is not a folder."""
    folder = Path(root)
    if not folder.is_dir():
        raise ValueError(f"--adapter-dir {folder} is not a folder")
    with os.scandir(folder) as entries:
        names = sorted(entry.name for entry in entries if entry.is_dir())
    return {
        name: folder / name
        for name in names
        if is_adapter_name(name) and (folder / name / CONFIG_FILE).is_file()
    }


class AdapterDirectory:
    """The listing of one adapter dir, rescanned when the dir's mtime changes."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._mtime_ns = self._stat_mtime()
        self._listing = list_adapter_folders(self.root)

    def listing(self) -> dict[str, Path]:
        """Adapter folders by name (a rescan first if the dir changed since the last one)."""
        mtime_ns = self._stat_mtime()
        if mtime_ns != self._mtime_ns:
            self._mtime_ns = mtime_ns
            try:
                self._listing = list_adapter_folders(self.root)
            except (OSError, ValueError):
                self._listing = {}  # the dir went away: nothing is listed
        return self._listing

    def resolve(self, name: str) -> Path | None:
        """The folder of adapter `name`, listed or just created; None if there is none."""
        listed = self.listing().get(name)
        if listed is not None:
            return listed
        if not is_adapter_name(name):
            return None
        folder = self.root / name
        try:
            found = (folder / CONFIG_FILE).is_file()
        except (OSError, ValueError):  # a name the file system cannot hold
            return None
        return folder if found else None

    def _stat_mtime(self) -> int:
        try:
            return os.stat(self.root).st_mtime_ns
        except OSError:
            return -1
