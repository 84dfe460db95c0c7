"""The memory-mapped safetensors reader gives exactly what safetensors' own reader gives, and refuses bad files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagoda.models.safetensors_mmap import iter_tensors, read_header


def test_every_dtype_and_shape_reads_back_exactly(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(7, 5, generator=generator),
        "bf16": torch.randn(3, 4, 2, generator=generator).to(torch.bfloat16),
        "f16": torch.randn(9, generator=generator).half(),
        "i64": torch.arange(-5, 6),
        "u8": torch.arange(0, 255, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
    }
    path = tmp_path / "weights.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    expected = load_file(path)
    read = dict(iter_tensors(path))
    assert read.keys() == expected.keys()
    for name, tensor in expected.items():
        assert read[name].dtype == tensor.dtype and read[name].shape == tensor.shape, name
        assert torch.equal(read[name], tensor), name


def test_views_are_private_copies_on_write(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(1024)}, path)
    before = path.read_bytes()
    (_, view), = iter_tensors(path)
    view.mul_(2)  # a model may scale its weights in place: the file must not change
    assert path.read_bytes() == before
    assert torch.equal(next(iter_tensors(path))[1], torch.ones(1024))


def _write(path: Path, header: object, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("header, data, message", [
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "do not hold"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16, "do not hold"),
    ({"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, "malformed"),
    ({"w": {"shape": [4]}}, b"", "malformed"),
])
def test_bad_entries_name_the_tensor(tmp_path: Path, header: dict, data: bytes, message: str) -> None:
    path = _write(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(ValueError, match=rf"'w'.*{message}|{message}.*'w'"):
        list(iter_tensors(path))


def test_bad_headers_are_value_errors(tmp_path: Path) -> None:
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\1\0")
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_header(short)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 1 << 40))
    with pytest.raises(ValueError, match="header length"):
        read_header(huge)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 4) + b"\xff{[}")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_header(garbage)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(struct.pack("<Q", 100) + b"{}")
    with pytest.raises(ValueError, match="truncated"):
        read_header(truncated)
