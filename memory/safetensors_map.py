"""The tensors of a safetensors file as views of its bytes: mapped, or read into a reused buffer.

The format (huggingface/safetensors): 8 bytes, the little-endian length N of a JSON header;
N bytes of header, `{name: {"dtype": "F32", "shape": [r, c], "data_offsets": [begin, end]},
"__metadata__": {...}}`; then the data, each tensor's bytes at [begin, end) counted from
the end of the header, row-major, little-endian. `map_tensors` checks every entry against
the file's size and returns a tensor per name whose storage is the mapped file. The map is
private copy-on-write, so a view written by mistake never reaches the file; it is unmapped
once the last view is dropped.

Reading an adapter (memory/adapter_store.py) copies each matrix once into its place in the
pool's layout. Its file, a few hundred KB to a few MB, is read instead into a buffer the
reading thread keeps (`ReadBuffers`): one copy out of the page cache, cheaper than mapping
it, which costs a page fault per few pages touched and, once unmapped, a TLB shootdown: an
interrupt to every core that runs another thread of the process, the engine's step among
them. A file read so is valid until the next read into the same thread's buffer.
"""

from __future__ import annotations

import functools
import io
import json
import math
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
HEADER_LENGTH_BYTES = 8
READ_BUFFER_MAX_BYTES = 32 * 2**20
"""Largest file read into a thread's reused buffer (larger ones are mapped): about an
adapter of a 7B-class model at rank 16 on q/k/v/o in 16-bit (33.5 MB). A loader thread
keeps its buffer as large as the largest file it read."""


class SafetensorsFormatError(ValueError):
    """The file is not a safetensors file this reader accepts (the message says why)."""


def map_tensors(path: Path) -> dict[str, torch.Tensor]:
    """name -> tensor of `path`, a view of its memory map (CPU); SafetensorsFormatError for
    a malformed file, OSError for one that cannot be opened."""
    return SafetensorsFile.open(path).tensors()


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the header, checked against the file: its bytes are data[begin:end]."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int


class ReadBuffers:
    """One buffer per thread that files are read into, grown to the largest file read (up
    to `max_bytes`) and kept: a thread reads one file at a time."""

    def __init__(self, max_bytes: int = READ_BUFFER_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._local = threading.local()

    def get(self, size: int) -> memoryview | None:
        """This thread's buffer, `size` bytes of it; None past `max_bytes`."""
        if size > self.max_bytes:
            return None
        buffer: bytearray | None = getattr(self._local, "buffer", None)
        if buffer is None or len(buffer) < size:
            buffer = self._local.buffer = bytearray(size)
        return memoryview(buffer)[:size]


class SafetensorsFile:
    """A safetensors file (mapped, or read into a buffer) whose header is read
    (`header_bytes`) but not yet parsed: what an adapter read keys its cached layout on
    (memory/adapter_store.py)."""

    def __init__(
        self,
        mapped: mmap.mmap | memoryview,
        data_start: int,
        size: int,
        status: os.stat_result,
    ) -> None:
        self.mapped = mapped
        """The file's bytes."""
        self.status = status
        """The file's status when it was opened, before its bytes were read or mapped."""
        self.data_start = data_start
        self.data_size = size - data_start
        """Bytes after the header."""
        self.header_bytes = bytes(mapped[HEADER_LENGTH_BYTES:data_start])
        """The JSON header as written: equal headers and sizes give equal `entries`."""

    @staticmethod
    def open(path: Path, buffers: ReadBuffers | None = None) -> SafetensorsFile:
        """Map `path`, or read it into this thread's buffer of `buffers` (if it fits), and read
        its header's length; SafetensorsFormatError if it does not fit the file, OSError if
        the file cannot be read."""
        with open(path, "rb", buffering=0) as file:
            status = os.fstat(file.fileno())
            size = status.st_size
            if size < HEADER_LENGTH_BYTES:
                raise SafetensorsFormatError(f"{size} bytes: shorter than a header")
            buffer = None if buffers is None else buffers.get(size)
            if buffer is None:
                mapped: mmap.mmap | memoryview = mmap.mmap(
                    file.fileno(), 0, access=mmap.ACCESS_COPY
                )
            else:
                _read_exactly(file, buffer)
                mapped = buffer
        header_length = int.from_bytes(mapped[:HEADER_LENGTH_BYTES], "little")
        data_start = HEADER_LENGTH_BYTES + header_length
        if data_start > size:
            raise SafetensorsFormatError(f"a header of {header_length} bytes in a {size}-byte file")
        return SafetensorsFile(mapped, data_start, size, status)

    @functools.cached_property
    def entries(self) -> dict[str, TensorEntry]:
        """name -> its checked header entry, in the header's order; SafetensorsFormatError
        for a malformed header."""
        try:
            header = json.loads(self.header_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SafetensorsFormatError(f"the header is not JSON ({error})") from None
        if not isinstance(header, dict):
            raise SafetensorsFormatError("the header is not a JSON object")
        return {
            name: _entry(name, entry, self.data_size)
            for name, entry in header.items()
            if name != "__metadata__"
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """name -> tensor, a view of the map (a copy for a tensor not aligned to its dtype)."""
        return {name: self._view(entry) for name, entry in self.entries.items()}

    def is_aligned(self, entry: TensorEntry) -> bool:
        """Whether the entry's data starts at a multiple of its element size (as
        safetensors writes it), so that `data(dtype)` holds it."""
        return (self.data_start + entry.begin) % entry.dtype.itemsize == 0

    def data(self, dtype: torch.dtype) -> torch.Tensor:
        """The data after the header as one 1-d tensor of `dtype`, a view of the map: an
        aligned entry of that dtype is its elements from `begin // itemsize`."""
        assert self.data_start % dtype.itemsize == 0, "the header does not end aligned"
        count = self.data_size // dtype.itemsize
        if count == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(self.mapped, dtype=dtype, count=count, offset=self.data_start)

    def _view(self, entry: TensorEntry) -> torch.Tensor:
        numel = math.prod(entry.shape)
        if numel == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        start = self.data_start + entry.begin
        if not self.is_aligned(entry):  # (not as safetensors writes): copied
            data = bytearray(self.mapped[start : start + numel * entry.dtype.itemsize])
            return torch.frombuffer(data, dtype=entry.dtype).view(entry.shape)
        view = torch.frombuffer(self.mapped, dtype=entry.dtype, count=numel, offset=start)
        return view.view(entry.shape)


def _read_exactly(file: io.FileIO, buffer: memoryview) -> None:
    """Fill `buffer` from `file`; OSError if the file ends first (it shrank since its size
    was read)."""
    filled = 0
    while filled < len(buffer):
        count = file.readinto(buffer[filled:])
        if not count:
            raise OSError(f"the file ended after {filled} of {len(buffer)} bytes")
        filled += count


def _entry(name: str, entry: object, data_size: int) -> TensorEntry:
    """Tensor `name`'s header `entry`, checked against the data's `data_size` bytes."""
    if not isinstance(entry, dict):
        raise SafetensorsFormatError(f"tensor {name}: its header entry is not an object")
    dtype = DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise SafetensorsFormatError(f"tensor {name}: dtype {entry.get('dtype')!r} is not read")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not _ints(shape) or not _ints(offsets) or len(offsets) != 2:
        raise SafetensorsFormatError(f"tensor {name}: shape or data_offsets are not integers")
    numel = math.prod(shape)
    begin, end = offsets
    if not 0 <= begin <= end <= data_size or end - begin != numel * dtype.itemsize:
        raise SafetensorsFormatError(
            f"tensor {name}: data_offsets {offsets} do not hold {dtype} {shape} in {data_size} bytes"
        )
    return TensorEntry(dtype, tuple(shape), begin)


def _ints(values: object) -> TypeGuard[list[int]]:
    return isinstance(values, list) and all(
        isinstance(value, int) and not isinstance(value, bool) and value >= 0 for value in values
    )
