"""EC connector layer: the store key of one item's encoder output, shared by the scheduler and worker sides.

The key reuses the KV store's `CacheEngineKey` so every tier, the checked
entry format and the lookup pair work unchanged: `model_id` is the model's
content identity, `kv_dtype` the dtype of the stored output, `layout` the
entry kind (`ENTRY_KIND`, which no KV chunk's layout can equal: those start
with "layer"), and `chunk_hash` the item's full `mm_hash` as UTF-8 bytes. An
encoder output therefore never answers for a KV chunk, another model or
another dtype, even in a disk folder or Redis namespace shared with them.
"""

from __future__ import annotations

from pagoda.kvstore.keys import CacheEngineKey

ENTRY_KIND = "encoder_output:v1"


class EncoderOutputKeys:
    """Keys of one engine's encoder outputs: its model and dtype, one key per item identifier."""

    def __init__(self, model_id: str, dtype: str) -> None:
        if not model_id:
            raise ValueError("model_id must name the model's identity, got an empty string")
        # World size 1, rank 0: an encoder output is whole on every rank, unlike a KV chunk's heads.
        self.template = CacheEngineKey(model_id, dtype, ENTRY_KIND, 1, 0, b"")

    def key(self, identifier: str) -> CacheEngineKey:
        """The key of item `identifier` (its mm_hash, never truncated)."""
        if not identifier:
            raise ValueError("an encoder-cache item identifier must not be empty")
        return self.template.with_chunk_hash(identifier.encode())
