"""Hypothesis fuzzing of the stored-entry decoder (the KV store's and the encoder store's entries): random
bytes and damaged entries never decode into a tensor other than the one stored, and fail only with
CorruptEntryError, the error every tier turns into "drop, count, recompute"."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from kvstore_helpers import make_key

from pagoda.kvstore.entry import CorruptEntryError, decode_entry, encode_entry, entry_to_numpy, peek_entry_key

KEY = make_key("fuzzed")
VALUES = np.arange(2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8)
ENTRY = encode_entry(KEY, VALUES, VALUES.shape, "float32")

# An edit: overwrite bytes at a position, cut the entry short, insert bytes, or append them.
edits = st.one_of(
    st.tuples(st.just("overwrite"), st.integers(0, len(ENTRY) - 1), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("truncate"), st.integers(0, len(ENTRY) - 1), st.just(b"")),
    st.tuples(st.just("insert"), st.integers(0, len(ENTRY)), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("append"), st.just(len(ENTRY)), st.binary(min_size=1, max_size=64)),
)


def _apply(data: bytes, edit: tuple[str, int, bytes]) -> bytes:
    kind, at, payload = edit
    if kind == "overwrite":
        return data[:at] + payload + data[at + len(payload):]
    if kind == "truncate":
        return data[:at]
    return data[:at] + payload + data[at:]


@settings(max_examples=1500, deadline=None, database=None, derandomize=True)
@given(st.binary(max_size=512))
def test_random_bytes_are_a_corrupt_entry(data: bytes) -> None:
    try:
        decoded = decode_entry(data, KEY)
    except CorruptEntryError:
        pass
    else:
        raise AssertionError(f"random bytes decoded into {decoded}")
    try:
        peek_entry_key(data)
    except CorruptEntryError:
        pass


@settings(max_examples=1500, deadline=None, database=None, derandomize=True)
@given(st.lists(edits, min_size=1, max_size=3))
def test_a_damaged_entry_is_refused_or_unchanged(changes: list[tuple[str, int, bytes]]) -> None:
    damaged = ENTRY
    for change in changes:
        damaged = _apply(damaged, change)
    try:
        decoded = decode_entry(damaged, KEY)
    except CorruptEntryError:
        assert damaged != ENTRY
        return
    # Only an edit that changed nothing (overwriting bytes with themselves) may decode, and to the same tensor.
    assert damaged == ENTRY
    np.testing.assert_array_equal(entry_to_numpy(decoded), VALUES)


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(st.text(min_size=1, max_size=12))
def test_an_entry_is_never_served_under_another_key(name: str) -> None:
    other = make_key(name)
    if other == KEY:
        return
    try:
        decode_entry(ENTRY, other)
    except CorruptEntryError as error:
        assert "another key" in str(error)
    else:
        raise AssertionError(f"an entry of {KEY} decoded as {other}")
