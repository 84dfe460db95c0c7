"""CacheEngineKey: canonical bytes, round trips, and no match across model, dtype, layout or rank."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest
from kvstore_helpers import make_key

from pagoda.kvstore.keys import CacheEngineKey


def test_bytes_round_trip() -> None:
    key = make_key("chunk")
    assert CacheEngineKey.from_bytes(key.to_bytes()) == key


def test_encoding_is_the_same_in_another_process() -> None:
    key = make_key("chunk")
    script = (
        "import hashlib; from pagoda.kvstore.keys import CacheEngineKey; "
        "h = hashlib.sha256(b'chunk').digest(); "
        "print(CacheEngineKey('google/gemma-3-270m', 'bfloat16', 'LBTHD', 1, 0, h).to_bytes().hex())"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert bytes.fromhex(result.stdout.strip()) == key.to_bytes()


@pytest.mark.parametrize(
    "field, value",
    [("model_id", "HuggingFaceTB/SmolLM2-135M"), ("kv_dtype", "float32"), ("layout", "LTBHD"),
     ("world_size", 2), ("worker_id", 1)],
)  # fmt: skip
def test_any_namespace_field_changes_the_key(field: str, value: object) -> None:
    base = make_key("chunk")
    other = make_key("chunk", **{field: value})
    assert other != base
    assert other.to_bytes() != base.to_bytes()
    assert other.to_string() != base.to_string()


def test_with_chunk_hash_keeps_the_namespace() -> None:
    template = make_key("a")
    key = template.with_chunk_hash(b"\x01" * 32)
    assert key.chunk_hash == b"\x01" * 32
    assert (key.model_id, key.kv_dtype, key.layout, key.world_size, key.worker_id) == (
        template.model_id, template.kv_dtype, template.layout, template.world_size, template.worker_id,
    )  # fmt: skip


def test_keys_are_frozen_and_garbage_does_not_decode() -> None:
    key = make_key()
    with pytest.raises(AttributeError):
        key.worker_id = 3  # type: ignore[misc]
    with pytest.raises(msgspec.DecodeError):
        CacheEngineKey.from_bytes(b"\x93\x01\x02\x03")
