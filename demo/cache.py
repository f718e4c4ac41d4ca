"""Folders built once into the user's cache: complete or absent, never half there.

    $XDG_CACHE_HOME/loraserve/NAME/     (default ~/.cache/loraserve/NAME)

A build goes to a temporary sibling folder renamed into place at the end, so an
interrupted build never leaves a half cache; a folder missing one of its expected
files is rebuilt; partial builds of processes that died are removed. Give a folder
a new NAME whenever what builds it changes, so that old caches are not reused.
No torch here: the front end calls this, and the build itself may run elsewhere.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

Progress = Callable[[str], None]


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/loraserve`, or `~/.cache/loraserve` when it is unset."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loraserve"


def ensure_built(
    folder: Path,
    expected_files: Sequence[str],
    build: Callable[[Path], None],
    progress: Progress,
) -> Path:
    """`folder`, built by `build(partial_folder)` unless it holds every expected file.

    `expected_files` are paths relative to the folder; `build` writes them all."""
    if not is_complete(folder, expected_files):
        if folder.exists():
            progress(f"cache {folder} is incomplete; rebuilding it")
            shutil.rmtree(folder)
        _build_atomically(folder, expected_files, build)
    return folder


def is_complete(folder: Path, expected_files: Sequence[str]) -> bool:
    return all((folder / name).is_file() for name in expected_files)


def _build_atomically(
    folder: Path, expected_files: Sequence[str], build: Callable[[Path], None]
) -> None:
    """Build into a sibling temporary folder, then rename it to `folder` in one step."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(folder)
    prefix = f".{folder.name}.partial-{os.getpid()}-"
    partial = Path(tempfile.mkdtemp(prefix=prefix, dir=folder.parent))
    try:
        build(partial)
        missing = [name for name in expected_files if not (partial / name).is_file()]
        if missing:
            raise RuntimeError(f"the build of {folder.name} wrote no {', '.join(missing)}")
        try:
            partial.rename(folder)
        except OSError:  # another process finished the same build first: keep its files
            if not is_complete(folder, expected_files):
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _remove_abandoned_builds(folder: Path) -> None:
    """Delete partial builds of `folder` whose process is gone (killed before cleaning up)."""
    for partial in folder.parent.glob(f".{folder.name}.partial-*"):
        pid = partial.name.removeprefix(f".{folder.name}.partial-").split("-")[0]
        if pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    return True
