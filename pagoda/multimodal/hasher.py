"""Multimodal (front end): `mm_hash`, the one key every cache uses for an image item.

It is the full hex blake3 (64 characters, never truncated: a short key lets
two images share KV blocks) of a framed encoding of the model's identity,
the processor settings that change the item's tensors, and the image's
content bytes. Each field is tagged and length-prefixed, so no two different
inputs produce the same byte stream; options are hashed in sorted-name order
with their types, so the order a caller wrote them in does not matter.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import blake3

# Names the encoding, so a change to it never collides with keys stored by an older one.
_DOMAIN = b"pagoda-mm-hash-v1"

OptionValue = bool | int | float | str


def mm_hash(model_identity: str, content: bytes, options: Mapping[str, OptionValue]) -> str:
    """Full hex blake3 over (model identity, options in canonical order, image content)."""
    if not isinstance(model_identity, str) or not model_identity:
        raise ValueError("mm_hash needs the model's identity (a non-empty string)")
    hasher = blake3.blake3()
    _field(hasher, b"D", _DOMAIN)
    _field(hasher, b"M", model_identity.encode())
    _field(hasher, b"N", struct.pack("<Q", len(options)))
    for name in sorted(options):
        _field(hasher, b"K", name.encode())
        _field(hasher, b"V", _encode_value(name, options[name]))
    _field(hasher, b"C", bytes(content))
    return hasher.hexdigest()


def _field(hasher: blake3.blake3, tag: bytes, payload: bytes) -> None:
    hasher.update(tag + struct.pack("<Q", len(payload)))
    hasher.update(payload)


def _encode_value(name: str, value: OptionValue) -> bytes:
    # bool before int: True is an int in Python, but a different option value here.
    if isinstance(value, bool):
        return b"b" + (b"1" if value else b"0")
    if isinstance(value, int):
        return b"i" + str(value).encode()
    if isinstance(value, float):
        return b"f" + value.hex().encode()
    if isinstance(value, str):
        return b"s" + value.encode()
    raise ValueError(f"processor option {name!r} has a value of type {type(value).__name__}, which mm_hash cannot key")
