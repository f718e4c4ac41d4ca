"""The host-RAM tier: reads on a loader thread, the LRU budget (count and bytes) that never
drops an adapter in use, refused folders remembered until their files change, and the
adapter dir's listing."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from factories import make_adapter, make_model

from loraserve.errors import AdapterError
from loraserve.memory.adapter_catalog import AdapterCatalog
from loraserve.memory.adapter_dir import AdapterDirectory, list_adapter_folders
from loraserve.memory.adapter_loader import AdapterLoader
from loraserve.memory.adapter_store import AdapterReader
from loraserve.memory.geometry import PoolGeometry
from loraserve.models.hf_config import load_arch

NAMES = ("a", "b", "c")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("catalog")
    model = make_model(root / "model", "llama", seed=5)
    adapters = root / "adapters"
    for seed, name in enumerate(NAMES):
        make_adapter(model, adapters / name, seed=seed, r=4, target_modules=["q_proj", "v_proj"])
    return {"model": root / "model", **{name: adapters / name for name in NAMES}}


def catalog_for(folders: dict[str, Path], workers: int = 0, **budget: int) -> AdapterCatalog:
    arch = load_arch(folders["model"])
    geometry = PoolGeometry.for_model(arch, block_size=8, max_lora_rank=8)
    reader = AdapterReader(arch, geometry, 8, torch.float32)
    catalog = AdapterCatalog(AdapterLoader(reader, workers), **budget)
    for name in NAMES:
        catalog.register(name, folders[name])
    return catalog


def poll_until(catalog: AdapterCatalog, count: int, timeout_s: float = 20.0) -> list:
    results: list = []
    deadline = time.monotonic() + timeout_s
    while len(results) < count and time.monotonic() < deadline:
        catalog.loader.wait(0.1)
        results += catalog.poll()
    return results


def test_registering_reads_nothing_and_a_request_reads_on_a_thread(folders) -> None:
    catalog = catalog_for(folders, workers=1)
    assert catalog.host_adapters() == [] and catalog.names() == list(NAMES)
    assert catalog.num_pages("a") == catalog.reader.max_num_pages  # unknown until read
    catalog.request("a")
    catalog.request("a")  # already on its way: one read
    assert catalog.is_loading("a") and not catalog.in_host("a")
    (result,) = poll_until(catalog, 1)
    assert result.name == "a" and result.error is None and result.seconds > 0
    assert catalog.in_host("a") and not catalog.is_loading("a")
    assert catalog.num_pages("a") == catalog.host("a").num_pages < catalog.reader.max_num_pages
    assert catalog.max_rank("a") == 4 and catalog.drain_load_seconds() == [result.seconds]


class ThreadCountingReader(AdapterReader):
    """The real reader, noting the torch thread count each read runs with."""

    seen: list[int]

    def read(self, name: str, path: str | Path):  # type: ignore[no-untyped-def]
        self.seen.append(torch.get_num_threads())
        return super().read(name, path)


@pytest.mark.parametrize("torch_threads", [1, None])
def test_a_loader_thread_reads_on_the_torch_threads_it_is_given(folders, torch_threads) -> None:
    arch = load_arch(folders["model"])
    geometry = PoolGeometry.for_model(arch, block_size=8, max_lora_rank=8)
    reader = ThreadCountingReader(arch, geometry, 8, torch.float32)
    reader.seen = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the engine thread's, here; a loader thread must not take it
    try:
        loader = AdapterLoader(reader, 1, torch_threads=torch_threads)
        loader.submit("a", folders["a"])
        assert loader.wait(20.0)
        (result,) = loader.poll()
        assert result.error is None and result.host is not None
        # None: torch's count for a thread that starts using it, the last one set (2)
        assert reader.seen == ([1] if torch_threads == 1 else [2])
        assert torch.get_num_threads() == 2  # the calling thread's own count is untouched
    finally:
        torch.set_num_threads(before)


def test_the_budget_drops_the_least_recently_used_idle_adapter(folders) -> None:
    catalog = catalog_for(folders, max_cpu_loras=1)
    catalog.set_in_use("a", True)
    for name in NAMES:
        catalog.request(name)
        catalog.poll()
    assert catalog.host_adapters() == ["a", "c"]  # a is in use: kept over the budget
    catalog.set_in_use("a", False)
    catalog.touch("a")
    catalog.request("b")
    catalog.poll()
    assert catalog.host_adapters() == ["b"]


def test_an_adapter_whose_last_request_ends_is_the_last_idle_one_dropped(folders) -> None:
    catalog = catalog_for(folders, max_cpu_loras=2)
    catalog.set_in_use("a", True)
    for name in NAMES:  # a in use; b dropped for c
        catalog.request(name)
        catalog.poll()
    assert catalog.host_adapters() == ["a", "c"]
    catalog.set_in_use("c", True)
    catalog.set_in_use("c", False)
    catalog.set_in_use("a", False)  # a's request ended last: c, read after a, goes first
    catalog.request("b")
    catalog.poll()
    assert catalog.host_adapters() == ["a", "b"]
    catalog.set_in_use("b", True)
    catalog.request("c")
    catalog.poll()  # over the budget: the one idle adapter but the one just read goes
    assert catalog.host_adapters() == ["b", "c"]


def test_the_byte_budget(folders) -> None:
    catalog = catalog_for(folders)
    one = catalog.read_now("a").num_bytes
    catalog = catalog_for(folders, max_cpu_bytes=2 * one)
    for name in NAMES:
        catalog.read_now(name)
    assert catalog.host_adapters() == ["b", "c"]


def test_a_refused_folder_is_remembered_until_its_files_change(folders, tmp_path) -> None:
    bad = shutil.copytree(folders["a"], tmp_path / "bad")
    (bad / "adapter_config.json").write_text("{not json")
    catalog = catalog_for(folders)
    catalog.register("bad", bad)
    submitted: list[str] = []
    submit = catalog.loader.submit
    catalog.loader.submit = lambda name, path: (submitted.append(name), submit(name, path))  # type: ignore[method-assign]
    catalog.request("bad")
    (result,) = catalog.poll()
    assert isinstance(result.error, AdapterError) and "not valid JSON" in str(result.error)
    for _ in range(3):
        with pytest.raises(AdapterError, match="not valid JSON"):
            catalog.request("bad")
    assert submitted == ["bad"]  # not read again
    shutil.copy(folders["a"] / "adapter_config.json", bad / "adapter_config.json")
    later = time.time() + 5
    os.utime(bad / "adapter_config.json", (later, later))  # a new mtime even on coarse clocks
    catalog.request("bad")
    (result,) = catalog.poll()
    assert result.error is None and catalog.in_host("bad") and submitted == ["bad", "bad"]


def test_a_read_of_an_unregistered_adapter_is_dropped(folders) -> None:
    catalog = catalog_for(folders, workers=1)
    catalog.request("a")
    catalog.unregister("a")
    time.sleep(0.5)
    assert catalog.poll() == [] and "a" not in catalog and catalog.host_adapters() == []


def test_the_adapter_dir_is_listed_and_rescanned_when_it_changes(folders, tmp_path) -> None:
    root = tmp_path / "dir"
    shutil.copytree(folders["a"], root / "a")
    (root / "notes").mkdir()  # no adapter config: not an adapter
    shutil.copytree(folders["a"], root / "my adapter")  # a name no request could serve under
    assert list(list_adapter_folders(root)) == ["a"]
    directory = AdapterDirectory(root)
    shutil.copytree(folders["b"], root / "b")
    assert directory.resolve("b") == root / "b"  # found at once, before any rescan
    assert directory.resolve("../a") is None and directory.resolve("missing") is None
    assert directory.resolve("my adapter") is None
    later = time.time() + 5
    os.utime(root, (later, later))
    assert list(directory.listing()) == ["a", "b"]
    with pytest.raises(ValueError, match="is not a folder"):
        list_adapter_folders(tmp_path / "nope")
