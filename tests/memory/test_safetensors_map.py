"""Tensors of a safetensors file as views of its memory map: the same values safetensors reads,
no copy (every tensor lies where the file puts it), the file never written, and malformed
headers refused with a reason. Read into a thread's buffer instead (`ReadBuffers`): the same
values, one buffer per thread reused, large files still mapped."""

from __future__ import annotations

import json
import mmap
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraserve.memory.safetensors_map import (
    ReadBuffers,
    SafetensorsFile,
    SafetensorsFormatError,
    map_tensors,
)


def saved(path: Path) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    tensors = {
        "a32": torch.randn(7, 64, generator=generator),
        "b16": torch.randn(96, 3, generator=generator).half(),
        "bbf": torch.randn(5, 9, generator=generator).bfloat16(),
        "i8": torch.arange(-4, 4, dtype=torch.int8),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, path, metadata={"format": "pt"})
    return tensors


def test_views_hold_what_safetensors_reads_without_copying(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    written = saved(path)
    before = path.read_bytes()
    mapped = map_tensors(path)
    reference = load_file(path)
    assert mapped.keys() == reference.keys() == written.keys()
    for name, tensor in mapped.items():
        assert tensor.dtype == reference[name].dtype and torch.equal(tensor, reference[name])
    # One mapping: each tensor's address is the mapping's start plus its offset in the file.
    header_length = struct.unpack("<Q", before[:8])[0]
    offsets = {
        name: entry["data_offsets"][0]
        for name, entry in json.loads(before[8 : 8 + header_length]).items()
        if name != "__metadata__" and name != "empty"
    }
    bases = {mapped[name].data_ptr() - offset for name, offset in offsets.items()}
    assert len(bases) == 1
    mapped["a32"].fill_(0.0)  # private copy-on-write: the file is untouched
    assert path.read_bytes() == before


def header_file(path: Path, header: object, data: bytes = b"\x00" * 16) -> Path:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ({"x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 32]}}, "do not hold"),
        ({"x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 4]}}, "do not hold"),
        ({"x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}}, "do not hold"),
        ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 16]}}, "not integers"),
        ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0]}}, "not integers"),
        ({"x": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}, "dtype 'C64'"),
        ({"x": [1, 2]}, "not an object"),
        ([1, 2], "not a JSON object"),
    ],
)
def test_malformed_headers_are_refused(tmp_path, header: object, match: str) -> None:
    with pytest.raises(SafetensorsFormatError, match=match):
        map_tensors(header_file(tmp_path / "w.safetensors", header))


def test_short_files_and_broken_headers_are_refused(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x01\x00")
    with pytest.raises(SafetensorsFormatError, match="shorter than a header"):
        map_tensors(path)
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(SafetensorsFormatError, match="header of 1000 bytes"):
        map_tensors(path)
    path.write_bytes(struct.pack("<Q", 4) + b"{not")
    with pytest.raises(SafetensorsFormatError, match="not JSON"):
        map_tensors(path)


def test_a_file_read_into_a_buffer_holds_what_safetensors_reads(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    saved(path)
    buffers = ReadBuffers()
    file = SafetensorsFile.open(path, buffers)
    assert isinstance(file.mapped, memoryview)  # read, not mapped
    reference = load_file(path)
    tensors = file.tensors()
    assert tensors.keys() == reference.keys()
    for name, tensor in tensors.items():
        assert tensor.dtype == reference[name].dtype and torch.equal(tensor, reference[name])
    assert file.header_bytes == path.read_bytes()[8 : file.data_start]


def test_a_thread_reuses_its_buffer_and_threads_do_not_share(tmp_path) -> None:
    small, large = tmp_path / "small.safetensors", tmp_path / "large.safetensors"
    save_file({"x": torch.arange(10.0)}, small)
    save_file({"x": torch.arange(1000.0)}, large)
    buffers = ReadBuffers()

    def address(path: Path) -> int:
        mapped = SafetensorsFile.open(path, buffers).mapped  # the file's bytes: where held
        return torch.frombuffer(mapped, dtype=torch.uint8).data_ptr()

    first = address(large)
    assert address(small) == address(large) == first  # grown once, then reused
    on_other_thread: list[int] = []
    thread = threading.Thread(target=lambda: on_other_thread.append(address(large)))
    thread.start()
    thread.join()
    assert on_other_thread[0] != first
    assert torch.equal(map_tensors(large)["x"], torch.arange(1000.0))


def test_a_file_past_the_buffer_limit_is_mapped(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"x": torch.arange(100.0)}, path)
    file = SafetensorsFile.open(path, ReadBuffers(max_bytes=path.stat().st_size - 1))
    assert isinstance(file.mapped, mmap.mmap)
    assert torch.equal(file.tensors()["x"], torch.arange(100.0))
