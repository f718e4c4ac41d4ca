"""The tensors of a safetensors file as views of its memory map: nothing copied to open it.

The format (huggingface/safetensors): 8 bytes, the little-endian length N of a JSON header;
N bytes of header, `{name: {"dtype": "F32", "shape": [r, c], "data_offsets": [begin, end]},
"__metadata__": {...}}`; then the data, each tensor's bytes at [begin, end) counted from
the end of the header, row-major, little-endian. `map_tensors` checks every entry against
the file's size and returns a tensor per name whose storage is the mapped file: reading an
adapter (memory/adapter_store.py) copies each matrix once, from the page cache straight
into its place in the pool's layout. The map is private copy-on-write, so a view written
by mistake never reaches the file; it is unmapped once the last view is dropped.
"""

from __future__ import annotations

import json
import math
import mmap
import os
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


class SafetensorsFormatError(ValueError):
    """The file is not a safetensors file this reader accepts (the message says why)."""


def map_tensors(path: Path) -> dict[str, torch.Tensor]:
    """name -> tensor of `path`, a view of its memory map (CPU); SafetensorsFormatError for
    a malformed file, OSError for one that cannot be opened."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size < HEADER_LENGTH_BYTES:
            raise SafetensorsFormatError(f"{size} bytes: shorter than a header")
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    header_length = int.from_bytes(mapped[:HEADER_LENGTH_BYTES], "little")
    data_start = HEADER_LENGTH_BYTES + header_length
    if data_start > size:
        raise SafetensorsFormatError(f"a header of {header_length} bytes in a {size}-byte file")
    try:
        header = json.loads(mapped[HEADER_LENGTH_BYTES:data_start])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SafetensorsFormatError(f"the header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError("the header is not a JSON object")
    return {
        name: _view(mapped, name, entry, data_start, size - data_start)
        for name, entry in header.items()
        if name != "__metadata__"
    }


def _view(mapped: mmap.mmap, name: str, entry: object, start: int, data_size: int) -> torch.Tensor:
    """Tensor `name` of the header's `entry`, checked against the data's `data_size` bytes."""
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
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    if (start + begin) % dtype.itemsize:  # unaligned (not as safetensors writes): copied
        data = bytearray(mapped[start + begin : start + end])
        return torch.frombuffer(data, dtype=dtype).view(shape)
    return torch.frombuffer(mapped, dtype=dtype, count=numel, offset=start + begin).view(shape)


def _ints(values: object) -> TypeGuard[list[int]]:
    return isinstance(values, list) and all(
        isinstance(value, int) and not isinstance(value, bool) and value >= 0 for value in values
    )
