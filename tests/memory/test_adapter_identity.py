"""An adapter's identity (the seed of its KV blocks' names in the prefix cache): a settled
file is named by its version, so reading it again, under any name, gives the same identity
without hashing its pages; a file changed since (its weights edited, however the times are
set), changed while it was read, or changed too recently to trust its times, is named by the
SHA-256 of the pages read."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import make_adapter, make_model
from safetensors.torch import load_file, save

from loraserve.kernels import native
from loraserve.memory import adapter_store
from loraserve.memory.adapter_store import (
    SETTLED_SECONDS,
    AdapterReader,
    HostAdapter,
    file_identity,
    weights_digest,
)
from loraserve.memory.geometry import PoolGeometry
from loraserve.memory.peft_format import SAFETENSORS_FILE
from loraserve.models.hf_config import load_arch

MAX_RANK = 8
SECOND_NS = 10**9


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    root = tmp_path_factory.mktemp("adapter_identity")
    model = make_model(root / "model", "llama-gqa")
    folder = make_adapter(model, root / "adapter", seed=3, r=4, target_modules=["q_proj", "v_proj"])
    return model, folder


@pytest.fixture
def folder(base, tmp_path: Path) -> Path:
    """A copy of the module's adapter, for this test to change."""
    return Path(shutil.copytree(base[1], tmp_path / "adapter"))


def new_reader(base, native_copies: bool = False) -> AdapterReader:
    arch = load_arch(base[1].parent / "model")
    geometry = PoolGeometry.for_model(arch, block_size=1, max_lora_rank=MAX_RANK)
    return AdapterReader(arch, geometry, MAX_RANK, torch.float32, native_copies=native_copies)


def pages_digest(host: HostAdapter) -> bytes:
    return weights_digest(host.pages, host.local_offsets, host.ranks)


def settled(monkeypatch) -> None:
    """Every file counts as settled: changed before now."""
    monkeypatch.setattr(adapter_store, "SETTLED_SECONDS", 0.0)


def rewrite_weights(folder: Path, factor: float) -> None:
    """Other weights written over the file's bytes in place (same inode, same size), its
    modification time set back to what it was."""
    weights = folder / SAFETENSORS_FILE
    before = weights.stat()
    time.sleep(0.05)  # past a tick of the file system's clock (the racy case is not this test's)
    tensors = {name: tensor * factor for name, tensor in load_file(weights).items()}
    encoded = save(tensors, metadata={"format": "pt"})
    with open(weights, "r+b") as file:
        file.write(encoded)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = weights.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    assert after.st_ctime_ns != before.st_ctime_ns


def test_a_settled_file_is_named_by_its_version_under_every_name(base, folder, monkeypatch):
    settled(monkeypatch)
    reader = new_reader(base)
    first, again, other_name = (reader.read(name, folder) for name in ("a", "a", "b"))
    assert first.identity == again.identity == other_name.identity
    assert first.identity != pages_digest(first)  # not hashed: named by the file's version


def test_other_weights_in_the_same_file_get_another_identity(base, folder, monkeypatch):
    """Same size and modification time: the change time still moves (no one can set it)."""
    settled(monkeypatch)
    reader = new_reader(base)
    first = reader.read("a", folder)
    rewrite_weights(folder, 2.0)
    second = reader.read("a", folder)
    assert not torch.equal(first.pages, second.pages)
    assert first.identity != second.identity


def test_other_layout_fields_get_another_identity(base, folder, monkeypatch):
    """One file (hard-linked into two folders) read with another lora_alpha: other scaled
    weights, another identity."""
    settled(monkeypatch)
    other = folder.parent / "other-alpha"
    other.mkdir()
    config = json.loads((folder / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps(config | {"lora_alpha": 3}))
    os.link(folder / SAFETENSORS_FILE, other / SAFETENSORS_FILE)
    reader = new_reader(base)
    first, second = reader.read("a", folder), reader.read("b", other)
    assert not torch.equal(first.pages, second.pages)
    assert first.identity != second.identity


@pytest.mark.parametrize("native_copies", [False, True])
def test_a_file_changed_while_read_is_named_by_its_pages(base, folder, monkeypatch, native_copies):
    """Its times move between its opening and the end of the copies: named by what was read."""
    if native_copies and not native.available():
        pytest.skip("the native library cannot be built here")
    settled(monkeypatch)
    reader = new_reader(base, native_copies)
    reader.read("warm", folder)  # the layout cached: the next read copies by plan
    copy_planned = adapter_store.copy_planned

    def touched_meanwhile(*args: Any) -> None:
        copy_planned(*args)
        os.utime(folder / SAFETENSORS_FILE, ns=(SECOND_NS, SECOND_NS))

    monkeypatch.setattr(adapter_store, "copy_planned", touched_meanwhile)
    host = reader.read("a", folder)
    assert host.identity == pages_digest(host)


def test_a_file_changed_lately_is_named_by_its_pages(base, folder):
    """At the default SETTLED_SECONDS a folder just written is named by its pages' digest."""
    host = new_reader(base).read("a", folder)
    assert host.identity == pages_digest(host)


def test_file_identity_trusts_a_version_only_once_settled(folder):
    status = (folder / SAFETENSORS_FILE).stat()
    changed = max(status.st_mtime_ns, status.st_ctime_ns)
    window = int(SETTLED_SECONDS * SECOND_NS)
    assert file_identity(status, status, b"x", now_ns=changed + window) is None
    named = file_identity(status, status, b"x", now_ns=changed + window + 1)
    assert named is not None
    assert named == file_identity(status, status, b"x", now_ns=changed + 100 * window)
    assert named != file_identity(status, status, b"y", now_ns=changed + window + 1)
    # parts are length-prefixed: their boundaries are part of the name
    assert file_identity(status, status, b"ab", b"c", now_ns=changed + window + 1) != (
        file_identity(status, status, b"a", b"bc", now_ns=changed + window + 1)
    )
    os.utime(folder / SAFETENSORS_FILE, ns=(SECOND_NS, SECOND_NS))  # set back: ctime moves
    after = (folder / SAFETENSORS_FILE).stat()
    assert file_identity(status, after, b"x", now_ns=changed + 100 * window) is None
