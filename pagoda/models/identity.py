"""Models layer: a model's identity by content, so KV stored for one model is never served to another.

Every KV store key names the model, and a folder's name says nothing about
what it holds: two fine-tunes may both sit in folders called `model`. The
identity is a digest of config.json and of the weight files: each file's
name, size and safetensors header (tensor names, dtypes, shapes, offsets),
plus a few small windows of every tensor's bytes. The windows matter:
fine-tunes of one base model have byte-identical headers and sizes, so
headers alone would let them share KV. The weights are never read whole
(a few reads per tensor), so the digest costs milliseconds at start-up.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import BinaryIO

from pagoda.models.weight_files import weight_files

# Bytes read at each sampled place of a tensor, and how many places (its start, its end, evenly between).
SAMPLE_BYTES = 64
SAMPLES_PER_TENSOR = 4
# A safetensors header longer than this is not one: refuse rather than read a huge file as a header.
MAX_HEADER_BYTES = 100 << 20


def model_identity(folder: Path, quantization: str | None = None) -> str:
    """`{model_type}-{16 hex digits}`: equal for folders with equal content, whatever their paths.

    `quantization` is part of it because quantized weights compute different KV.
    """
    digest = hashlib.blake2b(digest_size=8)
    config_bytes = (folder / "config.json").read_bytes()
    _add(digest, b"config.json", config_bytes)
    for path in weight_files(folder):
        with path.open("rb") as file:
            header = _read_header(file, path)
            size = path.stat().st_size
            _add(digest, path.name.encode(), header, struct.pack("<Q", size))
            _add(digest, *_tensor_samples(file, header, data_start=8 + len(header)))
    _add(digest, (quantization or "").encode())
    model_type = str(json.loads(config_bytes).get("model_type", "model"))
    return f"{model_type}-{digest.hexdigest()}"


def _add(digest: hashlib.blake2b, *parts: bytes) -> None:
    # Length-prefixed, so no two different sequences of parts hash the same bytes.
    for part in parts:
        digest.update(struct.pack("<Q", len(part)))
        digest.update(part)


def _read_header(file: BinaryIO, path: Path) -> bytes:
    (length,) = struct.unpack("<Q", file.read(8).ljust(8, b"\0"))
    if not 0 < length <= MAX_HEADER_BYTES:
        raise ValueError(f"{path} is not a safetensors file (header length {length})")
    header = file.read(length)
    if len(header) != length:
        raise ValueError(f"{path} is truncated inside its safetensors header")
    return header


def _tensor_samples(file: BinaryIO, header: bytes, data_start: int) -> list[bytes]:
    """A few windows of each tensor's bytes, tensors in name order."""
    samples: list[bytes] = []
    tensors = json.loads(header)
    for name in sorted(tensors):
        if name == "__metadata__":
            continue
        begin, end = tensors[name]["data_offsets"]
        width = min(SAMPLE_BYTES, end - begin)
        span = end - begin - width
        for index in range(SAMPLES_PER_TENSOR):
            file.seek(data_start + begin + span * index // (SAMPLES_PER_TENSOR - 1))
            samples.append(file.read(width))
    return samples
