"""Building, caching and choosing the native kernels (kernels/native_build.py, dispatch)."""

from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from loraserve.kernels import native, native_build
from loraserve.kernels.dispatch import select_kernels

needs_compiler = pytest.mark.skipif(not native.available(), reason="no C compiler")


@needs_compiler
def test_concurrent_builds_into_a_fresh_cache_give_one_whole_library(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    paths: list[Path] = []
    threads = [threading.Thread(target=lambda: paths.append(native_build.build())) for _ in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(paths) == 2 and paths[0] == paths[1]
    assert paths[0].parent == tmp_path / "loraserve" / "native"
    assert [path.name for path in paths[0].parent.iterdir()] == [paths[0].name]  # no temp left
    assert ctypes.CDLL(str(paths[0])).loraserve_lora_shrink is not None
    assert native_build.build() == paths[0]  # cached: the same name for the same sources


@needs_compiler
@pytest.mark.skipif(
    platform.machine() != "x86_64" or shutil.which("objdump") is None,
    reason="reads x86-64 code with objdump",
)
def test_lora_kernels_keep_their_prefetches():
    """The LoRA kernels prefetch the next work item's weights into L2 (`prefetcht2`, one in
    shrink, one in expand): a compiler that counts a function of prefetches alone as pure
    drops the calls to it, which no result shows, only the speed (kernels/native_lora.c)."""
    code = subprocess.run(
        ["objdump", "-d", str(native_build.build())], capture_output=True, text=True, check=True
    ).stdout
    assert code.count("prefetcht2") >= 2


def test_no_compiler_says_so(monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(native_build.shutil, "which", lambda name: None)
    with pytest.raises(native_build.NativeKernelsUnavailable, match="need a C compiler"):
        native_build.build()


@needs_compiler
def test_compiler_errors_are_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native_build, "FLAG_SETS", (("-fno-such-flag-at-all",),))
    with pytest.raises(native_build.NativeKernelsUnavailable, match="no-such-flag-at-all"):
        native_build.build()
    assert not any((tmp_path / "loraserve" / "native").iterdir())


@needs_compiler
def test_dispatch_chooses_native_for_float32_on_cpu():
    assert select_kernels("auto", "cpu", torch.float32).name == "native"
    assert select_kernels("native", "cpu", torch.float32).paged_attention is native.paged_attention
    assert select_kernels("auto", "cpu", torch.bfloat16).name == "torch"
    assert select_kernels("auto", "cpu").name == "torch"  # dtype not known
    assert select_kernels("torch", "cpu", torch.float32).name == "torch"


@pytest.mark.parametrize(("device", "dtype"), [("cpu", torch.float16), ("cuda", torch.float32)])
def test_dispatch_rejects_native_off_cpu_float32(device: str, dtype: torch.dtype):
    with pytest.raises(ValueError, match="native"):
        select_kernels("native", device, dtype)
