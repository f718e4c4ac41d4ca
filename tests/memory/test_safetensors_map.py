"""Tensors of a safetensors file as views of its memory map: the same values safetensors reads,
no copy (every tensor lies where the file puts it), the file never written, and malformed
headers refused with a reason."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraserve.memory.safetensors_map import SafetensorsFormatError, map_tensors


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
