"""Stored entry format: round trip, and every kind of corruption raises CorruptEntryError."""

from __future__ import annotations

import numpy as np
import pytest
from kvstore_helpers import make_entry, make_key

from pagoda.kvstore.entry import (
    FIXED_HEADER_SIZE,
    CorruptEntryError,
    decode_entry,
    encode_entry,
    entry_to_numpy,
    peek_entry_key,
)


def test_round_trip_is_bit_identical() -> None:
    key = make_key("k")
    values = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    entry = encode_entry(key, values, values.shape, "float32")
    decoded = decode_entry(entry, key)
    assert decoded.shape == (2, 3, 4)
    assert decoded.dtype == "float32"
    np.testing.assert_array_equal(entry_to_numpy(decoded), values)
    assert peek_entry_key(entry) == (key, len(entry))


def test_bfloat16_travels_as_raw_bytes() -> None:
    key = make_key("bf16")
    raw = np.arange(8, dtype=np.uint16)
    decoded = decode_entry(encode_entry(key, raw.tobytes(), (2, 4), "bfloat16"), key)
    assert bytes(decoded.payload) == raw.tobytes()
    np.testing.assert_array_equal(entry_to_numpy(decoded), raw.reshape(2, 4))


def test_encode_rejects_inconsistent_input() -> None:
    key = make_key()
    with pytest.raises(ValueError, match="needs 16 bytes"):
        encode_entry(key, b"\0" * 15, (4,), "float32")
    with pytest.raises(ValueError, match="dtype must be one of"):
        encode_entry(key, b"\0" * 4, (4,), "complex8")


def flip(data: bytes, index: int) -> bytes:
    corrupted = bytearray(data)
    corrupted[index] ^= 0x01
    return bytes(corrupted)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda e: flip(e, len(e) - 1), "checksum"),  # last payload byte
        (lambda e: flip(e, FIXED_HEADER_SIZE + 3), "checksum"),  # inside the key
        (lambda e: flip(e, FIXED_HEADER_SIZE - 1), "checksum"),  # the checksum itself
        (lambda e: e[:-1], "length"),
        (lambda e: e + b"\0", "length"),
        (lambda e: e[:10], "truncated"),
        (lambda e: b"XXXX" + e[4:], "magic"),
        (lambda e: e[:4] + b"\x07\x00" + e[6:], "version"),
    ],
)
def test_corruption_is_detected(corrupt, message: str) -> None:
    key = make_key("k")
    with pytest.raises(CorruptEntryError, match=message):
        decode_entry(corrupt(make_entry(key)), key)


def test_wrong_key_is_detected() -> None:
    entry = make_entry(make_key("k"))
    with pytest.raises(CorruptEntryError, match="another key"):
        decode_entry(entry, make_key("other"))
    with pytest.raises(CorruptEntryError, match="another key"):
        decode_entry(entry, make_key("k", worker_id=1))
