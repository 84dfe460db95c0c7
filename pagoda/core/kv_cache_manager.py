"""Core layer: the scheduler's single entry point for KV blocks — prefix lookup, allocation, freeing.

The scheduler sees blocks only through `KVCacheBlocks`; groups, managers and
the pool stay behind this facade.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pagoda.core.block_pool import KVCacheBlock
from pagoda.core.kv_cache_coordinator import KVCacheCoordinator
from pagoda.core.kv_cache_events import KVCacheEvent
from pagoda.core.kv_cache_interface import KVCacheConfig
from pagoda.core.request import Request
from pagoda.core.stats import PrefixCacheStats


@dataclass(frozen=True, slots=True)
class KVCacheBlocks:
    """Blocks of one request, one sequence per KV cache group; opaque to the scheduler."""

    blocks: tuple[Sequence[KVCacheBlock], ...]

    def __add__(self, other: KVCacheBlocks) -> KVCacheBlocks:
        return KVCacheBlocks(tuple([*mine, *theirs] for mine, theirs in zip(self.blocks, other.blocks)))

    def get_block_ids(self) -> tuple[list[int], ...]:
        return tuple([block.block_id for block in group_blocks] for group_blocks in self.blocks)

    def is_empty(self) -> bool:
        return not any(self.blocks)


class KVCacheManager:
    """Prefix-cache lookup and block allocation for every request, across all groups."""

    def __init__(
        self,
        kv_cache_config: KVCacheConfig,
        max_model_len: int,
        enable_caching: bool = True,
        log_stats: bool = False,
        enable_kv_cache_events: bool = False,
    ) -> None:
        self.kv_cache_config = kv_cache_config
        self.max_model_len = max_model_len
        self.enable_caching = enable_caching
        self.log_stats = log_stats
        self.block_size = kv_cache_config.block_size
        self.coordinator = KVCacheCoordinator(kv_cache_config, enable_caching, enable_kv_cache_events)
        self.block_pool = self.coordinator.block_pool
        self.empty_kv_cache_blocks = KVCacheBlocks(tuple(() for _ in kv_cache_config.groups))
        self._prefix_cache_stats = PrefixCacheStats()

    @property
    def usage(self) -> float:
        """Fraction of usable blocks in use."""
        return self.block_pool.get_usage()

    def get_num_free_blocks(self) -> int:
        return self.block_pool.get_num_free_blocks()

    def make_prefix_cache_stats(self) -> PrefixCacheStats | None:
        """Lookups since the previous call (None when stats are off), then start counting afresh."""
        if not self.log_stats:
            return None
        stats, self._prefix_cache_stats = self._prefix_cache_stats, PrefixCacheStats()
        return stats

    def get_computed_blocks(self, request: Request) -> tuple[KVCacheBlocks, int]:
        """The longest cached prefix of a request not yet scheduled: its blocks and length in tokens.

        Skipped when the request wants prompt logprobs, which need every
        prompt position computed. The hit stops at least one token short of
        the end: the model must run on some token to produce the next.
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return self.empty_kv_cache_blocks, 0
        max_cache_hit_length = max(request.num_tokens - 1, 0)
        blocks, num_computed_tokens = self.coordinator.find_longest_cache_hit(
            request.block_hashes, max_cache_hit_length
        )
        if self.log_stats:
            self._prefix_cache_stats += PrefixCacheStats(1, request.num_tokens, num_computed_tokens)
        return KVCacheBlocks(blocks), num_computed_tokens

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        num_new_computed_tokens: int = 0,
        new_computed_blocks: KVCacheBlocks | None = None,
        delay_cache_blocks: bool = False,
    ) -> KVCacheBlocks | None:
        """Give the request slots for `num_new_tokens` more tokens; None if the pool is short.

        Token positions of the request, left to right::

            |<-- computed -->|<- new computed ->|<---- new ---->|<- not scheduled ->|
            |  earlier steps | prefix-cache hits| this step     | later steps       |
            |<------ num_computed_tokens ------>|               |
            |<------ slots needed (capped at max_model_len) --->|
            |<------ blocks full in here get cached ----------->|

        computed = request.num_computed_tokens, new computed =
        num_new_computed_tokens (backed by `new_computed_blocks`), new =
        num_new_tokens. Steps: free the blocks that fell out of a sliding
        window; count the free blocks needed (hits now in the free queue count
        too, touching takes them out); take a reference on the hits; allocate
        new blocks; enter every newly full block into the prefix cache.

        Blocks are cached before this step computes their KV. A request
        admitted later in the same step may reuse them; the worker writes a
        layer's KV for the whole batch before that layer's attention reads it.

        With `delay_cache_blocks` nothing is cached now: the KV of these
        blocks comes from the KV store and is not known good until the load
        is confirmed (`commit_loaded_blocks`).

        Returns only the blocks allocated now, one list per group.
        """
        if num_new_tokens <= 0:
            raise ValueError(f"num_new_tokens must be positive, got {num_new_tokens}")
        hits = (new_computed_blocks if new_computed_blocks is not None else self.empty_kv_cache_blocks).blocks
        request_id = request.request_id
        self.coordinator.remove_skipped_blocks(request_id, request.num_computed_tokens)

        num_computed_tokens = request.num_computed_tokens + num_new_computed_tokens
        num_tokens_need_slot = min(num_computed_tokens + num_new_tokens, self.max_model_len)
        num_blocks_to_allocate = self.coordinator.get_num_blocks_to_allocate(
            request_id, num_tokens_need_slot, hits, num_computed_tokens)
        if num_blocks_to_allocate > self.block_pool.get_num_free_blocks():
            return None

        if self.enable_caching:
            for group_hits in hits:
                self.block_pool.touch(group_hits)
        else:
            assert not any(hits), "prefix-cache hits while prefix caching is off"
        self.coordinator.save_new_computed_blocks(request_id, hits)
        new_blocks = self.coordinator.allocate_new_blocks(request_id, num_tokens_need_slot, num_computed_tokens)
        if self.enable_caching and not delay_cache_blocks:
            self.coordinator.cache_blocks(request, min(num_computed_tokens + num_new_tokens, request.num_tokens))
        return KVCacheBlocks(new_blocks)

    def commit_loaded_blocks(self, request: Request) -> None:
        """Enter blocks whose KV a confirmed store load (or compute) made valid up to `num_computed_tokens`.

        Sliding-window blocks that fell out of the window first become null
        blocks: the store never loaded them, so they must not be cached.
        """
        self.coordinator.remove_skipped_blocks(request.request_id, request.num_computed_tokens)
        if self.enable_caching:
            self.coordinator.cache_blocks(request, min(request.num_computed_tokens, request.num_tokens))

    def free(self, request: Request) -> None:
        """Release all blocks of a finished or preempted request (cached ones stay revivable)."""
        self.coordinator.free(request.request_id)

    def get_blocks(self, request_id: str) -> KVCacheBlocks:
        """All blocks the request holds now (null blocks where a sliding window dropped them)."""
        return KVCacheBlocks(self.coordinator.get_blocks(request_id))

    def get_block_ids(self, request_id: str) -> tuple[list[int], ...]:
        return self.get_blocks(request_id).get_block_ids()

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash; False (and nothing done) while any block is in use."""
        return self.block_pool.reset_prefix_cache()

    def take_events(self) -> list[KVCacheEvent]:
        return self.block_pool.take_events()
