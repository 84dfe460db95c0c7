"""Core layer: per-group block tables, with the rules of one attention type (full, sliding window).

Each KV cache group gets one manager. The manager owns the list of blocks
of every request in its group and knows two things specific to its
attention type: which blocks a request no longer needs, and how to find the
longest usable prefix-cache hit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from pagoda.core.block_hash import BlockHash
from pagoda.core.block_pool import BlockPool, KVCacheBlock
from pagoda.core.kv_cache_interface import FullAttentionSpec, KVCacheSpec, SlidingWindowSpec
from pagoda.core.request import Request


def cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)


class SingleTypeKVCacheManager(ABC):
    """Block bookkeeping for one KV cache group."""

    def __init__(self, kv_cache_spec: KVCacheSpec, block_pool: BlockPool, kv_cache_group_id: int) -> None:
        self.kv_cache_spec = kv_cache_spec
        self.block_size = kv_cache_spec.block_size
        self.block_pool = block_pool
        self.kv_cache_group_id = kv_cache_group_id
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # Leading blocks of each request already entered into the prefix cache.
        self.num_cached_block: dict[str, int] = {}

    def get_num_blocks_to_allocate(
        self, request_id: str, num_tokens: int, new_computed_blocks: Sequence[KVCacheBlock],
        num_computed_tokens: int = 0,
    ) -> int:
        """Free blocks that holding `num_tokens` would consume, prefix-cache hits included.

        Blocks no token after `num_computed_tokens` attends to need no memory
        (see `allocate_new_blocks`).
        """
        num_held = len(self.req_to_blocks.get(request_id, ())) + len(new_computed_blocks)
        num_held = max(num_held, self.get_num_skipped_tokens(num_computed_tokens) // self.block_size)
        num_new_blocks = max(cdiv(num_tokens, self.block_size) - num_held, 0)
        # A hit that sits in the free queue leaves it when touched: it costs a free block too.
        num_revived_blocks = sum(1 for block in new_computed_blocks if block.ref_cnt == 0 and not block.is_null)
        return num_new_blocks + num_revived_blocks

    def save_new_computed_blocks(self, request_id: str, new_computed_blocks: Sequence[KVCacheBlock]) -> None:
        """Record prefix-cache hits as the first blocks of a request new to this manager."""
        if request_id in self.req_to_blocks:
            assert not new_computed_blocks, "only a new request can start from cached blocks"
            return
        self.req_to_blocks[request_id] = list(new_computed_blocks)
        self.num_cached_block[request_id] = len(new_computed_blocks)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_computed_tokens: int = 0) -> list[KVCacheBlock]:
        """Append fresh blocks until the request holds slots for `num_tokens` tokens.

        Positions before the window of `num_computed_tokens` get the null
        block: that happens when KV from the KV store covers tokens no prefix
        hit or earlier step holds blocks for, and the store loads only the
        window of a sliding-window layer.
        """
        blocks = self.req_to_blocks[request_id]
        num_skipped_blocks = self.get_num_skipped_tokens(num_computed_tokens) // self.block_size
        if len(blocks) < num_skipped_blocks:
            blocks.extend([self.block_pool.null_block] * (num_skipped_blocks - len(blocks)))
        num_new_blocks = cdiv(num_tokens, self.block_size) - len(blocks)
        if num_new_blocks <= 0:
            return []
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
        blocks.extend(new_blocks)
        return new_blocks

    def cache_blocks(self, request: Request, num_tokens: int) -> None:
        """Enter the request's blocks that became full within its first `num_tokens` tokens."""
        num_cached_blocks = self.num_cached_block[request.request_id]
        num_full_blocks = num_tokens // self.block_size
        if num_full_blocks <= num_cached_blocks:
            return
        self.block_pool.cache_full_blocks(
            request,
            self.req_to_blocks[request.request_id],
            num_cached_blocks,
            num_full_blocks,
            self.block_size,
            self.kv_cache_group_id,
        )
        self.num_cached_block[request.request_id] = num_full_blocks

    def free(self, request_id: str) -> None:
        """Release all the request's blocks, tail first so its tail is evicted first."""
        blocks = self.req_to_blocks.pop(request_id, [])
        self.num_cached_block.pop(request_id, None)
        self.block_pool.free_blocks(reversed(blocks))

    def get_num_skipped_tokens(self, num_computed_tokens: int) -> int:
        """Leading tokens no later token attends to, once `num_computed_tokens` are computed."""
        return 0

    def remove_skipped_blocks(self, request_id: str, num_computed_tokens: int) -> None:
        """Swap blocks holding only skipped tokens for the null block, and free them."""
        num_skipped_blocks = self.get_num_skipped_tokens(num_computed_tokens) // self.block_size
        blocks = self.req_to_blocks.get(request_id)
        if num_skipped_blocks <= 0 or not blocks:
            return
        null_block = self.block_pool.null_block
        removed = []
        for index in range(min(num_skipped_blocks, len(blocks)) - 1, -1, -1):
            if blocks[index].is_null:  # everything before was removed in an earlier step
                break
            removed.append(blocks[index])
            blocks[index] = null_block
        self.block_pool.free_blocks(removed)

    @classmethod
    @abstractmethod
    def find_longest_cache_hit(
        cls,
        block_hashes: Sequence[BlockHash],
        max_length: int,
        kv_cache_group_ids: Sequence[int],
        block_pool: BlockPool,
        kv_cache_spec: KVCacheSpec,
    ) -> tuple[list[KVCacheBlock], ...]:
        """Cached blocks for the longest usable prefix of at most `max_length` tokens.

        Returns one list per group id, all of the same length: the hit is
        `len(list) * block_size` tokens. The groups share `kv_cache_spec`, and
        a block counts only when every one of them has it cached.
        """


class FullAttentionManager(SingleTypeKVCacheManager):
    """Every token attends to all before it: a hit is an unbroken run of blocks from the start."""

    @classmethod
    def find_longest_cache_hit(
        cls,
        block_hashes: Sequence[BlockHash],
        max_length: int,
        kv_cache_group_ids: Sequence[int],
        block_pool: BlockPool,
        kv_cache_spec: KVCacheSpec,
    ) -> tuple[list[KVCacheBlock], ...]:
        hits: tuple[list[KVCacheBlock], ...] = tuple([] for _ in kv_cache_group_ids)
        max_num_blocks = min(max_length // kv_cache_spec.block_size, len(block_hashes))
        for block_hash in block_hashes[:max_num_blocks]:
            cached = block_pool.get_cached_block(block_hash, kv_cache_group_ids)
            if cached is None:
                break
            for group_hits, block in zip(hits, cached):
                group_hits.append(block)
        return hits


class SlidingWindowManager(SingleTypeKVCacheManager):
    """Token i attends to token j only when i - j < sliding_window.

    Blocks wholly before the window are handed back to the pool as the
    request advances, and a prefix hit needs only the window's blocks just
    before the hit's end; earlier positions hold the null block.
    """

    def get_num_skipped_tokens(self, num_computed_tokens: int) -> int:
        assert isinstance(self.kv_cache_spec, SlidingWindowSpec)
        # The next token computed sits at position num_computed_tokens.
        return max(num_computed_tokens - self.kv_cache_spec.sliding_window + 1, 0)

    @classmethod
    def find_longest_cache_hit(
        cls,
        block_hashes: Sequence[BlockHash],
        max_length: int,
        kv_cache_group_ids: Sequence[int],
        block_pool: BlockPool,
        kv_cache_spec: KVCacheSpec,
    ) -> tuple[list[KVCacheBlock], ...]:
        assert isinstance(kv_cache_spec, SlidingWindowSpec)
        block_size = kv_cache_spec.block_size
        # The first token after the hit attends to sliding_window - 1 earlier tokens.
        num_needed_blocks = cdiv(kv_cache_spec.sliding_window - 1, block_size)
        max_num_blocks = min(max_length // block_size, len(block_hashes))
        hits = tuple([block_pool.null_block] * max_num_blocks for _ in kv_cache_group_ids)
        # Scan right to left; blocks [end - num_contiguous, end) are a cached run.
        end = max_num_blocks
        num_contiguous = 0
        index = max_num_blocks - 1
        while num_contiguous < num_needed_blocks and index >= 0:
            cached = block_pool.get_cached_block(block_hashes[index], kv_cache_group_ids)
            if cached is None:
                end, num_contiguous = index, 0
            else:
                for group_hits, block in zip(hits, cached):
                    group_hits[index] = block
                num_contiguous += 1
            index -= 1
        # A run reaching the start is a hit even if shorter than the window.
        for group_hits in hits:
            del group_hits[end:]
        return hits


spec_manager_map: dict[type[KVCacheSpec], type[SingleTypeKVCacheManager]] = {
    FullAttentionSpec: FullAttentionManager,
    SlidingWindowSpec: SlidingWindowManager,
}


def get_manager_for_kv_cache_spec(
    kv_cache_spec: KVCacheSpec, block_pool: BlockPool, kv_cache_group_id: int
) -> SingleTypeKVCacheManager:
    manager_class = spec_manager_map[type(kv_cache_spec)]
    return manager_class(kv_cache_spec, block_pool, kv_cache_group_id)
