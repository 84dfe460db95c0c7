"""KV connector layer: how the paged KV cache maps onto stored entries and their keys.

One entry holds one layer's K and V for one chunk of prompt tokens:
[2, chunk_size, num_kv_heads, head_size] in the KV cache's dtype. Per-layer
entries let a load stream layer by layer and let sliding-window layers fetch
only the chunks inside their window. Every entry's key carries the model, the
KV dtype and a layout string naming the layer and its shape, so KV of another
model, dtype or layer never matches.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagoda.core.kv_cache_interface import KVCacheConfig, SlidingWindowSpec
from pagoda.kvstore.keys import CacheEngineKey


@dataclass(frozen=True, slots=True)
class LayerLayout:
    layer_index: int
    group_index: int
    num_kv_heads: int
    head_size: int
    sliding_window: int | None
    key_template: CacheEngineKey

    def key(self, chunk_hash: bytes) -> CacheEngineKey:
        return self.key_template.with_chunk_hash(chunk_hash)

    def first_needed_position(self, start: int, end: int) -> int:
        """The first position in [start, end) whose KV a token computed at `end` or later can attend to."""
        if self.sliding_window is None:
            return start
        return max(start, end - self.sliding_window + 1)


class StoreLayout:
    """Per-layer entry layout of one engine's KV cache; built identically on the scheduler and worker sides."""

    def __init__(self, model_id: str, kv_dtype: str, kv_cache_config: KVCacheConfig, chunk_size: int,
                 world_size: int = 1, rank: int = 0) -> None:
        if chunk_size % kv_cache_config.block_size:
            raise ValueError(f"chunk_size ({chunk_size}) must be a multiple of block_size "
                             f"({kv_cache_config.block_size})")
        self.chunk_size = chunk_size
        self.block_size = kv_cache_config.block_size
        layers: dict[int, LayerLayout] = {}
        for group_index, group in enumerate(kv_cache_config.groups):
            spec = group.spec
            window = spec.sliding_window if isinstance(spec, SlidingWindowSpec) else None
            for layer_index in group.layer_indices:
                attention = "full" if window is None else f"swa{window}"
                layout = (f"layer{layer_index}:{attention}:{spec.num_kv_heads}x{spec.head_size}"
                          f":chunk{chunk_size}")
                template = CacheEngineKey(model_id, kv_dtype, layout, world_size, rank, b"")
                layers[layer_index] = LayerLayout(layer_index, group_index, spec.num_kv_heads, spec.head_size,
                                                  window, template)
        self.layers = [layers[index] for index in sorted(layers)]

    def lookup_keys(self, chunk_hashes: list[bytes]) -> list[CacheEngineKey]:
        """One key per chunk standing for the whole chunk: the last layer's, the last entry of a chunk written."""
        return [self.layers[-1].key(chunk_hash) for chunk_hash in chunk_hashes]

    def chunk_range(self, chunk_index: int) -> tuple[int, int]:
        return chunk_index * self.chunk_size, (chunk_index + 1) * self.chunk_size
