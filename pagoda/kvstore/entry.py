"""KV store layer: the byte format of one stored entry, a checked header followed by raw KV bytes.

Layout (little-endian):

    fixed header   magic "PGKV" | version u16 | key length u32 | ndim u8 |
                   dtype length u8 | payload length u64 | checksum 8 bytes
    variable part  key bytes | dtype (ASCII) | shape (ndim x u64)
    payload        raw tensor bytes, C order

The checksum is xxh3-64 over everything except the checksum field itself, so
a flipped bit anywhere (key, shape, dtype or payload) is caught. Decoding
never unpickles and never returns bytes that failed a check: the caller gets
`CorruptEntryError` and recomputes instead.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from math import prod

import msgspec
import numpy as np
import xxhash

from pagoda.kvstore.keys import CacheEngineKey

MAGIC = b"PGKV"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<4sHIBBQ8s")
FIXED_HEADER_SIZE = _FIXED.size
_CHECKSUM_OFFSET = FIXED_HEADER_SIZE - 8

# Bytes per element; bfloat16 and float8 are named by string because numpy has no such dtypes.
DTYPE_SIZES: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1,
}  # fmt: skip
_NUMPY_STAND_INS = {"bfloat16": "uint16", "float8_e4m3fn": "uint8", "float8_e5m2": "uint8"}


class CorruptEntryError(ValueError):
    """Stored bytes that fail any check; the entry must be dropped and its tokens recomputed."""


@dataclass(frozen=True, slots=True)
class DecodedEntry:
    """A checked entry: `payload` is a view into the stored bytes, no copy."""

    shape: tuple[int, ...]
    dtype: str
    payload: memoryview


def _as_bytes_view(data: np.ndarray | bytes | bytearray | memoryview) -> memoryview:
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data)
    return memoryview(data).cast("B")


def _checksum(*parts: bytes | memoryview) -> bytes:
    hasher = xxhash.xxh3_64()
    for part in parts:
        hasher.update(part)
    return hasher.digest()


def encode_entry(
    key: CacheEngineKey,
    data: np.ndarray | bytes | bytearray | memoryview,
    shape: tuple[int, ...],
    dtype: str,
) -> bytes:
    """Header + raw bytes of `data`; raises ValueError if shape, dtype and length disagree."""
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_SIZES)}, got {dtype!r}")
    payload = _as_bytes_view(data)
    if prod(shape) * DTYPE_SIZES[dtype] != payload.nbytes:
        raise ValueError(
            f"shape {shape} of {dtype} needs {prod(shape) * DTYPE_SIZES[dtype]} bytes, got {payload.nbytes}"
        )
    key_bytes = key.to_bytes()
    dtype_bytes = dtype.encode("ascii")
    variable = key_bytes + dtype_bytes + struct.pack(f"<{len(shape)}Q", *shape)
    fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, len(key_bytes), len(shape), len(dtype_bytes), payload.nbytes, b"\0" * 8)
    checksum = _checksum(fixed[:_CHECKSUM_OFFSET], variable, payload)
    return b"".join((fixed[:_CHECKSUM_OFFSET], checksum, variable, payload))


def _parse_header(view: memoryview) -> tuple[int, int, int, int, bytes, int]:
    """(key length, ndim, dtype length, payload length, checksum, variable part length) of a header."""
    if view.nbytes < FIXED_HEADER_SIZE:
        raise CorruptEntryError(f"truncated header: {view.nbytes} bytes")
    magic, version, key_len, ndim, dtype_len, payload_len, checksum = _FIXED.unpack_from(view)
    if magic != MAGIC:
        raise CorruptEntryError(f"bad magic {magic!r}")
    if version != FORMAT_VERSION:
        raise CorruptEntryError(f"unsupported format version {version}")
    return key_len, ndim, dtype_len, payload_len, checksum, key_len + dtype_len + 8 * ndim


def peek_entry_key(data: bytes | memoryview) -> tuple[CacheEngineKey, int]:
    """The key and total entry size from the header alone (no checksum): how a disk index is rebuilt cheaply."""
    view = memoryview(data).cast("B")
    key_len, _, _, payload_len, _, variable_len = _parse_header(view)
    if view.nbytes < FIXED_HEADER_SIZE + key_len:
        raise CorruptEntryError("truncated key")
    try:
        key = CacheEngineKey.from_bytes(view[FIXED_HEADER_SIZE : FIXED_HEADER_SIZE + key_len])
    except msgspec.DecodeError as exc:
        raise CorruptEntryError(f"undecodable key: {exc}") from None
    return key, FIXED_HEADER_SIZE + variable_len + payload_len


def decode_entry(data: bytes | bytearray | memoryview, expected_key: CacheEngineKey) -> DecodedEntry:
    """Check every field of an entry against itself and `expected_key`; CorruptEntryError on any mismatch."""
    view = memoryview(data).cast("B")
    key_len, ndim, dtype_len, payload_len, checksum, variable_len = _parse_header(view)
    body_start = FIXED_HEADER_SIZE + variable_len
    if view.nbytes != body_start + payload_len:
        raise CorruptEntryError(f"length {view.nbytes} != {body_start + payload_len} declared by the header")
    if _checksum(view[:_CHECKSUM_OFFSET], view[FIXED_HEADER_SIZE:]) != checksum:
        raise CorruptEntryError("checksum mismatch")
    offset = FIXED_HEADER_SIZE
    if bytes(view[offset : offset + key_len]) != expected_key.to_bytes():
        raise CorruptEntryError("entry belongs to another key")
    offset += key_len
    dtype = bytes(view[offset : offset + dtype_len]).decode("ascii", errors="replace")
    offset += dtype_len
    shape = struct.unpack_from(f"<{ndim}Q", view, offset)
    if dtype not in DTYPE_SIZES or prod(shape) * DTYPE_SIZES[dtype] != payload_len:
        raise CorruptEntryError(f"shape {shape} of {dtype!r} does not match {payload_len} payload bytes")
    return DecodedEntry(shape=shape, dtype=dtype, payload=view[body_start:])


def entry_to_numpy(entry: DecodedEntry) -> np.ndarray:
    """A read-only numpy view of a decoded entry; bfloat16 and float8 come back as raw unsigned integers."""
    numpy_dtype = _NUMPY_STAND_INS.get(entry.dtype, entry.dtype)
    return np.frombuffer(entry.payload, dtype=numpy_dtype).reshape(entry.shape)
