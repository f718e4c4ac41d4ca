"""loraserve.demo.cache: a folder is built once, atomically, and rebuilt when incomplete.

The builds here write empty files: the tests are of caching, not of content (the
toy's and the real demo's builds are tested in test_toy_demo.py and test_demo.py).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from loraserve.demo.cache import default_cache_dir, ensure_built

FILES = ("config.json", "sub/weights.bin")


class Builds:
    """A build that writes every file of FILES, empty, and counts its calls."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, folder: Path) -> None:
        self.count += 1
        for name in FILES:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(b"")


def test_built_once_then_reused(tmp_path: Path) -> None:
    build, messages = Builds(), []
    folder = ensure_built(tmp_path / "thing-v1", FILES, build, messages.append)
    assert folder == tmp_path / "thing-v1" and all((folder / n).is_file() for n in FILES)
    assert ensure_built(folder, FILES, build, messages.append) == folder
    assert build.count == 1 and messages == []
    assert [p.name for p in tmp_path.iterdir()] == ["thing-v1"]  # no partial left over


def test_an_incomplete_cache_is_rebuilt(tmp_path: Path) -> None:
    build, messages = Builds(), []
    folder = ensure_built(tmp_path / "thing-v1", FILES, build, messages.append)
    (folder / "sub" / "weights.bin").unlink()
    ensure_built(folder, FILES, build, messages.append)
    assert build.count == 2 and (folder / "sub" / "weights.bin").is_file()
    assert len(messages) == 1 and "incomplete" in messages[0]


def test_an_interrupted_build_leaves_no_cache(tmp_path: Path) -> None:
    def interrupted(folder: Path) -> None:
        Builds()(folder)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ensure_built(tmp_path / "thing-v1", FILES, interrupted, print)
    assert list(tmp_path.iterdir()) == []


def test_a_build_that_misses_a_file_fails_and_leaves_no_cache(tmp_path: Path) -> None:
    def forgetful(folder: Path) -> None:
        (folder / "config.json").write_text("{}")

    with pytest.raises(RuntimeError, match=r"thing-v1 wrote no sub/weights\.bin"):
        ensure_built(tmp_path / "thing-v1", FILES, forgetful, print)
    assert list(tmp_path.iterdir()) == []


def test_abandoned_partial_builds_are_removed(tmp_path: Path) -> None:
    dead_pid = _pid_of_a_finished_process()
    abandoned = tmp_path / f".thing-v1.partial-{dead_pid}-abc123"
    running = tmp_path / f".thing-v1.partial-{os.getpid()}-def456"
    abandoned.mkdir()
    running.mkdir()
    ensure_built(tmp_path / "thing-v1", FILES, Builds(), print)
    assert not abandoned.exists()
    assert running.exists()  # another build of this process (or a live one) is left alone


def test_default_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "loraserve"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "loraserve"


def _pid_of_a_finished_process() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid
