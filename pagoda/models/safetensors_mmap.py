"""Models layer: a safetensors file's tensors as views of the memory-mapped file, never copied on read.

`safetensors`' own readers copy every tensor into fresh memory. Loading
Gemma 3 270M's float32 checkpoint that way first-touched a gigabyte of new
pages only to cast it to bfloat16 and drop it; on a freshly booted virtual
machine each of those 4 KiB pages is a fault the host serves. Views of a
private mapping instead read the page cache in place: a cast reads them
once, and a float32 model keeps them as its weights (copy-on-write, so
nothing writes back to the file).

The format is small and fixed: 8 bytes of little-endian header length, a
JSON header naming each tensor's dtype, shape and byte range in the data
section, then the data.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# A header larger than this is not a safetensors file (the format caps it at 100 MB).
_MAX_HEADER_BYTES = 100 << 20


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and where its data section starts; ValueError if malformed."""
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its header length)")
        (length,) = struct.unpack("<Q", prefix)
        if not 0 < length <= _MAX_HEADER_BYTES:
            raise ValueError(f"{path}: not a safetensors file (header length {length})")
        raw = file.read(length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: safetensors header is not valid JSON: {err}") from err
    if not isinstance(header, dict) or len(raw) != length:
        raise ValueError(f"{path}: safetensors header is truncated or not a JSON object")
    return header, 8 + length


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the file, each a view of one private memory mapping."""
    path = Path(path)
    header, data_start = read_header(path)
    with open(path, "rb") as file:
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    data_size = len(mapping) - data_start
    for name, info in header.items():
        if name == "__metadata__":
            continue
        yield name, _view(path, mapping, data_start, data_size, name, info)


def _view(path: Path, mapping: mmap.mmap, data_start: int, data_size: int, name: str, info: dict) -> torch.Tensor:
    try:
        dtype = _DTYPES[info["dtype"]]
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(offset) for offset in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from err
    numel = 1
    for dim in shape:
        numel *= dim
    element_size = torch.empty((), dtype=dtype).element_size()
    if not 0 <= begin <= end <= data_size or end - begin != numel * element_size:
        raise ValueError(f"{path}: tensor {name!r} bytes [{begin}, {end}) do not hold its shape {shape} "
                         f"of {info['dtype']} within the file's {data_size} data bytes")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mapping, dtype=dtype, count=numel, offset=data_start + begin).view(shape)
