"""Core layer: drives one manager per KV cache group over one shared block pool.

All groups draw from the same `BlockPool` (one block id means the same
bytes in every group, see `kv_cache_interface`). Most calls fan out to every
group; the prefix lookup is the interesting one: a hit must be usable by
every group at once.
"""

from __future__ import annotations

from collections.abc import Sequence

from pagoda.core.block_hash import BlockHash
from pagoda.core.block_pool import BlockPool, KVCacheBlock
from pagoda.core.kv_cache_interface import KVCacheConfig, KVCacheSpec
from pagoda.core.request import Request
from pagoda.core.single_type_managers import (
    SingleTypeKVCacheManager,
    get_manager_for_kv_cache_spec,
    spec_manager_map,
)


class KVCacheCoordinator:
    """One `SingleTypeKVCacheManager` per group, indexed by group id."""

    def __init__(self, kv_cache_config: KVCacheConfig, enable_caching: bool, enable_kv_cache_events: bool) -> None:
        self.kv_cache_config = kv_cache_config
        self.block_size = kv_cache_config.block_size
        if any(group.spec.block_size != self.block_size for group in kv_cache_config.groups):
            raise ValueError("all KV cache groups must share one block_size")
        self.block_pool = BlockPool(kv_cache_config.num_blocks, enable_caching, enable_kv_cache_events)
        self.single_type_managers: tuple[SingleTypeKVCacheManager, ...] = tuple(
            get_manager_for_kv_cache_spec(group.spec, self.block_pool, group_id)
            for group_id, group in enumerate(kv_cache_config.groups)
        )
        # Groups with identical specs are looked up together, in group order
        # (full attention first: its hit is cheap to find and bounds the rest).
        specs: dict[KVCacheSpec, list[int]] = {}
        for group_id, group in enumerate(kv_cache_config.groups):
            specs.setdefault(group.spec, []).append(group_id)
        self.attention_groups: tuple[tuple[KVCacheSpec, tuple[int, ...]], ...] = tuple(
            (spec, tuple(group_ids)) for spec, group_ids in specs.items()
        )

    @property
    def num_groups(self) -> int:
        return len(self.single_type_managers)

    def get_num_blocks_to_allocate(
        self, request_id: str, num_tokens: int, new_computed_blocks: tuple[Sequence[KVCacheBlock], ...],
        num_computed_tokens: int = 0,
    ) -> int:
        return sum(
            manager.get_num_blocks_to_allocate(request_id, num_tokens, blocks, num_computed_tokens)
            for manager, blocks in zip(self.single_type_managers, new_computed_blocks)
        )

    def save_new_computed_blocks(
        self, request_id: str, new_computed_blocks: tuple[Sequence[KVCacheBlock], ...]
    ) -> None:
        for manager, blocks in zip(self.single_type_managers, new_computed_blocks):
            manager.save_new_computed_blocks(request_id, blocks)

    def allocate_new_blocks(
        self, request_id: str, num_tokens: int, num_computed_tokens: int = 0
    ) -> tuple[list[KVCacheBlock], ...]:
        return tuple(manager.allocate_new_blocks(request_id, num_tokens, num_computed_tokens)
                     for manager in self.single_type_managers)

    def cache_blocks(self, request: Request, num_tokens: int) -> None:
        for manager in self.single_type_managers:
            manager.cache_blocks(request, num_tokens)

    def free(self, request_id: str) -> None:
        for manager in self.single_type_managers:
            manager.free(request_id)

    def remove_skipped_blocks(self, request_id: str, num_computed_tokens: int) -> None:
        for manager in self.single_type_managers:
            manager.remove_skipped_blocks(request_id, num_computed_tokens)

    def get_blocks(self, request_id: str) -> tuple[list[KVCacheBlock], ...]:
        return tuple(manager.req_to_blocks.get(request_id, []) for manager in self.single_type_managers)

    def find_longest_cache_hit(
        self, block_hashes: Sequence[BlockHash], max_cache_hit_length: int
    ) -> tuple[tuple[list[KVCacheBlock], ...], int]:
        """Per-group hit blocks and the hit length in tokens, valid for every group.

        Each attention type is asked for its longest hit within the current
        length, which can only shrink it. A sliding-window hit is not
        necessarily valid when cut shorter, so the passes repeat until one
        pass leaves the length unchanged: then every type found exactly that
        length. The length is block-aligned after the first lookup.
        """
        hit_length = max_cache_hit_length
        hits_by_group: dict[int, list[KVCacheBlock]] = {}
        while True:
            pass_start_length = hit_length
            for spec, group_ids in self.attention_groups:
                manager_class = spec_manager_map[type(spec)]
                hits = manager_class.find_longest_cache_hit(
                    block_hashes, hit_length, group_ids, self.block_pool, spec
                )
                hit_length = len(hits[0]) * self.block_size
                hits_by_group.update(zip(group_ids, hits))
            if hit_length == pass_start_length:
                break
        return tuple(hits_by_group[group_id] for group_id in range(self.num_groups)), hit_length
