"""Core layer: the shape of the paged KV cache, shared by the scheduler and the worker.

Pure data. The worker describes each attention layer with a `KVCacheSpec`;
`make_kv_cache_config` groups layers and sizes the block pool; the scheduler's
KV cache manager keeps one block table per group and the worker maps each
group's block ids onto its layers' tensors.

Grouping follows vLLM's hybrid allocator: layers of one attention type form a
group, and types with more layers are split so that every group has the same
number of layers. Layer `j` of every group then shares KV tensor `j`, so one
block id means the same number of bytes in any group and all groups draw from
one `BlockPool`.
"""

from __future__ import annotations

from dataclasses import dataclass

# One list of block ids per KV cache group.
BlockIds = tuple[list[int], ...]


@dataclass(frozen=True, slots=True)
class FullAttentionSpec:
    """A causal attention layer that keeps the KV of every token."""

    block_size: int
    num_kv_heads: int
    head_size: int
    dtype_size: int  # bytes per element

    @property
    def page_size_bytes(self) -> int:
        """Bytes of one block (K and V) in one layer."""
        return 2 * self.block_size * self.num_kv_heads * self.head_size * self.dtype_size


@dataclass(frozen=True, slots=True)
class SlidingWindowSpec(FullAttentionSpec):
    """A causal layer where token i attends to tokens j with i - j < sliding_window."""

    sliding_window: int = 0

    def __post_init__(self) -> None:
        if self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive, got {self.sliding_window}")


KVCacheSpec = FullAttentionSpec  # SlidingWindowSpec is a subclass


@dataclass(frozen=True, slots=True)
class KVCacheGroupSpec:
    """Layers that share one block table."""

    layer_indices: tuple[int, ...]
    spec: KVCacheSpec


@dataclass(frozen=True, slots=True)
class KVCacheConfig:
    """How many blocks the pool has and which layers each group covers."""

    num_blocks: int  # including the null block (id 0)
    groups: tuple[KVCacheGroupSpec, ...]

    @property
    def num_kv_tensors(self) -> int:
        """Tensors to allocate per kind (K, V): group position j shares tensor j."""
        return max(len(group.layer_indices) for group in self.groups)

    @property
    def block_size(self) -> int:
        return self.groups[0].spec.block_size

    @property
    def bytes_per_block(self) -> int:
        return self.num_kv_tensors * self.groups[0].spec.page_size_bytes

    def positions_used_by(self, layers: range) -> set[int]:
        """The tensor positions the layers in `layers` use (a pipeline stage allocates only these)."""
        return {position for group in self.groups for position, layer_index in enumerate(group.layer_indices)
                if layer_index in layers}


def group_layers(layer_specs: list[KVCacheSpec]) -> tuple[KVCacheGroupSpec, ...]:
    """Group layer indices by identical spec, then split into groups of equal size."""
    by_spec: dict[KVCacheSpec, list[int]] = {}
    for layer_index, spec in enumerate(layer_specs):
        by_spec.setdefault(spec, []).append(layer_index)
    if len({spec.page_size_bytes for spec in by_spec}) != 1:
        raise ValueError("all attention layers must have the same KV page size")
    group_size = min(len(layers) for layers in by_spec.values())
    groups: list[KVCacheGroupSpec] = []
    # Full attention first: the hybrid prefix lookup starts from it.
    ordered = sorted(by_spec.items(), key=lambda item: isinstance(item[0], SlidingWindowSpec))
    for spec, layers in ordered:
        for start in range(0, len(layers), group_size):
            groups.append(KVCacheGroupSpec(tuple(layers[start : start + group_size]), spec))
    return tuple(groups)


def make_kv_cache_config(layer_specs: list[KVCacheSpec], memory_bytes: int) -> KVCacheConfig:
    """Size the block pool to fit `memory_bytes` of KV tensors."""
    if not layer_specs:
        raise ValueError("a model needs at least one attention layer")
    groups = group_layers(layer_specs)
    config = KVCacheConfig(num_blocks=1, groups=groups)
    num_blocks = memory_bytes // config.bytes_per_block
    if num_blocks < 2:
        raise ValueError(
            f"kv_cache_memory of {memory_bytes} bytes holds fewer than 2 blocks "
            f"of {config.bytes_per_block} bytes"
        )
    return KVCacheConfig(num_blocks=num_blocks, groups=groups)
