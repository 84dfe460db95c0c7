"""KV store layer: the key naming one chunk of KV for one model, dtype, layout and rank.

KV saved by a different model, KV dtype, memory layout or worker rank is not
interchangeable, so all of them are part of the key next to the chunk's
prefix hash. Keys cross process and storage boundaries, so they have one
canonical byte encoding (msgpack of a fixed field order); Python's `hash()`
is never used to name stored data.
"""

from __future__ import annotations

import msgspec


class CacheEngineKey(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """The identity of one stored chunk; equal keys mean interchangeable KV."""

    model_id: str
    kv_dtype: str
    layout: str
    world_size: int
    worker_id: int
    chunk_hash: bytes

    def to_bytes(self) -> bytes:
        """Canonical encoding: the same bytes in every process and on every machine."""
        return _ENCODER.encode(self)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> CacheEngineKey:
        """Inverse of `to_bytes`; raises `msgspec.DecodeError` on anything else."""
        return _DECODER.decode(data)

    def to_string(self) -> str:
        """A readable form for logs and namespaced remote keys."""
        return (
            f"{self.model_id}@{self.kv_dtype}@{self.layout}@{self.worker_id}/{self.world_size}@{self.chunk_hash.hex()}"
        )

    def with_chunk_hash(self, chunk_hash: bytes) -> CacheEngineKey:
        """The same namespace, another chunk: how per-chunk keys are derived from one template."""
        return msgspec.structs.replace(self, chunk_hash=chunk_hash)


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(CacheEngineKey)
