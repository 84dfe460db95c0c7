"""Core layer: the pool of KV blocks — reference counts, the LRU free queue and the prefix-cache map.

A block is in exactly one of two states: referenced (ref_cnt > 0, owned by
one or more requests) or free (ref_cnt == 0, in the free queue). A free
block may still carry its hash: it stays findable in the prefix cache until
`get_new_blocks` pops it for reuse, which evicts it. Freed blocks join the
tail of the queue and new blocks come from its head, so the least recently
freed block is evicted first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pagoda.core.block_hash import (
    BlockHash,
    BlockHashWithGroupId,
    get_block_hash,
    get_group_id,
    make_block_hash_with_group_id,
)
from pagoda.core.kv_cache_events import AllBlocksCleared, BlockRemoved, BlockStored, KVCacheEvent
from pagoda.core.request import Request


class KVCacheBlock:
    """One block of KV slots, with the links of the free queue stored in the block itself."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free_block", "next_free_block", "is_null")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        # Set while the block is in the prefix cache (full, hashed, not yet evicted).
        self.block_hash: BlockHashWithGroupId | None = None
        self.prev_free_block: KVCacheBlock | None = None
        self.next_free_block: KVCacheBlock | None = None
        self.is_null = False

    def __repr__(self) -> str:
        prev_id = self.prev_free_block.block_id if self.prev_free_block else None
        next_id = self.next_free_block.block_id if self.next_free_block else None
        return (
            f"KVCacheBlock(block_id={self.block_id}, ref_cnt={self.ref_cnt}, "
            f"cached={self.block_hash is not None}, prev_free={prev_id}, next_free={next_id})"
        )


class FreeKVCacheBlockQueue:
    """Free blocks in eviction order, as an intrusive doubly linked list.

    The links live in the blocks, so removing a block from the middle (a
    prefix-cache hit reviving a freed block) is O(1) and allocates nothing.
    Two sentinel blocks (id -1) bound the list so no operation special-cases
    an empty list or an end. A block is in the queue exactly when its links
    are set.
    """

    def __init__(self, blocks: list[KVCacheBlock]) -> None:
        self.num_free_blocks = len(blocks)
        self.fake_free_list_head = KVCacheBlock(-1)
        self.fake_free_list_tail = KVCacheBlock(-1)
        chain = [self.fake_free_list_head, *blocks, self.fake_free_list_tail]
        for left, right in zip(chain, chain[1:]):
            left.next_free_block = right
            right.prev_free_block = left

    def popleft(self) -> KVCacheBlock:
        """Remove and return the block evicted next."""
        block = self.fake_free_list_head.next_free_block
        if block is self.fake_free_list_tail or block is None:
            raise ValueError("no free blocks left")
        self.remove(block)
        return block

    def popleft_n(self, n: int) -> list[KVCacheBlock]:
        """Remove and return the first `n` blocks, in queue order."""
        if n > self.num_free_blocks:
            raise ValueError(f"cannot pop {n} blocks, only {self.num_free_blocks} are free")
        blocks = []
        block = self.fake_free_list_head.next_free_block
        for _ in range(n):
            assert block is not None
            blocks.append(block)
            next_block = block.next_free_block
            block.prev_free_block = block.next_free_block = None
            block = next_block
        self.fake_free_list_head.next_free_block = block
        assert block is not None
        block.prev_free_block = self.fake_free_list_head
        self.num_free_blocks -= n
        return blocks

    def remove(self, block: KVCacheBlock) -> None:
        prev_block, next_block = block.prev_free_block, block.next_free_block
        if prev_block is None or next_block is None:
            raise RuntimeError(f"block {block.block_id} is not in the free queue")
        prev_block.next_free_block = next_block
        next_block.prev_free_block = prev_block
        block.prev_free_block = block.next_free_block = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        self.append_n([block])

    def append_n(self, blocks: Sequence[KVCacheBlock]) -> None:
        """Put `blocks` at the tail (evicted last), keeping their order."""
        last = self.fake_free_list_tail.prev_free_block
        assert last is not None
        for block in blocks:
            block.prev_free_block = last
            last.next_free_block = block
            last = block
        last.next_free_block = self.fake_free_list_tail
        self.fake_free_list_tail.prev_free_block = last
        self.num_free_blocks += len(blocks)

    def get_all_free_blocks(self) -> list[KVCacheBlock]:
        """Every free block, head (next evicted) to tail."""
        blocks = []
        block = self.fake_free_list_head.next_free_block
        while block is not None and block is not self.fake_free_list_tail:
            blocks.append(block)
            block = block.next_free_block
        return blocks


class BlockPool:
    """All KV blocks of all groups; block 0 is the `null_block`, never handed out or freed.

    The null block stands in for slots a request no longer needs (sliding
    window tokens that fell out of the window) or never computed itself.
    """

    def __init__(self, num_blocks: int, enable_caching: bool, enable_kv_cache_events: bool = False) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2 (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.enable_kv_cache_events = enable_kv_cache_events
        self.blocks = [KVCacheBlock(block_id) for block_id in range(num_blocks)]
        self.free_block_queue = FreeKVCacheBlockQueue(self.blocks)
        # One block per key: a second block computed with the same content
        # while the first was cached simply stays uncached.
        self.cached_block_hash_to_block: dict[BlockHashWithGroupId, KVCacheBlock] = {}
        self.null_block = self.free_block_queue.popleft()
        self.null_block.is_null = True
        self._events: list[KVCacheEvent] = []

    def get_cached_block(self, block_hash: BlockHash, group_ids: Sequence[int]) -> list[KVCacheBlock] | None:
        """The cached block for `block_hash` in each group, or None if any group misses it."""
        blocks = []
        for group_id in group_ids:
            block = self.cached_block_hash_to_block.get(make_block_hash_with_group_id(block_hash, group_id))
            if block is None:
                return None
            blocks.append(block)
        return blocks

    def cache_full_blocks(
        self,
        request: Request,
        blocks: list[KVCacheBlock],
        num_cached_blocks: int,
        num_full_blocks: int,
        block_size: int,
        group_id: int,
    ) -> None:
        """Enter `blocks[num_cached_blocks:num_full_blocks]` into the prefix cache.

        Blocks before `num_cached_blocks` were cached earlier; the hashes come
        from `request.block_hashes`, which covers every full block.
        """
        assert self.enable_caching, "caching blocks while prefix caching is off"
        if num_cached_blocks >= num_full_blocks:
            return
        assert len(request.block_hashes) >= num_full_blocks, "block hashes lag behind the tokens"
        stored: list[int] = []
        for index in range(num_cached_blocks, num_full_blocks):
            block = blocks[index]
            if block.is_null:  # dropped from a sliding window before its (delayed) caching: nothing to keep
                continue
            assert block.block_hash is None, f"block {block.block_id} is already cached"
            key = make_block_hash_with_group_id(request.block_hashes[index], group_id)
            if key in self.cached_block_hash_to_block:
                continue
            block.block_hash = key
            self.cached_block_hash_to_block[key] = block
            stored.append(index)
        if self.enable_kv_cache_events:
            self._record_stored(request, stored, block_size, group_id)

    def _record_stored(self, request: Request, stored: list[int], block_size: int, group_id: int) -> None:
        """One BlockStored event per run of consecutive block indices."""
        runs: list[list[int]] = []
        for index in stored:
            if runs and runs[-1][-1] == index - 1:
                runs[-1].append(index)
            else:
                runs.append([index])
        for run in runs:
            parent = request.block_hashes[run[0] - 1] if run[0] > 0 else None
            tokens = request.all_token_ids[run[0] * block_size : (run[-1] + 1) * block_size]
            hashes = tuple(request.block_hashes[index] for index in run)
            self._events.append(BlockStored(hashes, parent, tuple(tokens), block_size, group_id))

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Pop `num_blocks` free blocks, least recently freed first, evicting their hashes."""
        if num_blocks > self.get_num_free_blocks():
            raise ValueError(f"cannot get {num_blocks} blocks, only {self.get_num_free_blocks()} are free")
        blocks = self.free_block_queue.popleft_n(num_blocks)
        for block in blocks:
            assert block.ref_cnt == 0, f"free block {block.block_id} is referenced"
            self._maybe_evict_cached_block(block)
            block.ref_cnt = 1
        return blocks

    def _maybe_evict_cached_block(self, block: KVCacheBlock) -> None:
        if block.block_hash is None:
            return
        del self.cached_block_hash_to_block[block.block_hash]
        if self.enable_kv_cache_events:
            key = block.block_hash
            self._events.append(BlockRemoved((get_block_hash(key),), get_group_id(key)))
        block.block_hash = None

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on prefix-cache hits, reviving those that sat in the free queue."""
        for block in blocks:
            if block.is_null:
                continue
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block; unreferenced ones join the free queue in order.

        Callers pass a request's blocks tail first, so the tail of a sequence
        (the part least likely to be shared) is evicted before its prefix.
        """
        freed = []
        for block in ordered_blocks:
            if block.is_null:
                continue
            assert block.ref_cnt > 0, f"block {block.block_id} freed more often than referenced"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                freed.append(block)
        self.free_block_queue.append_n(freed)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False) while any block is in use."""
        if self.get_num_free_blocks() != self.num_blocks - 1:
            return False
        self.cached_block_hash_to_block.clear()
        for block in self.blocks:
            block.block_hash = None
        if self.enable_kv_cache_events:
            self._events.append(AllBlocksCleared())
        return True

    def get_num_free_blocks(self) -> int:
        return self.free_block_queue.num_free_blocks

    def get_usage(self) -> float:
        """Fraction of usable blocks (all but the null block) currently referenced."""
        return 1.0 - self.get_num_free_blocks() / (self.num_blocks - 1)

    def take_events(self) -> list[KVCacheEvent]:
        """Events since the previous call (always empty when events are disabled)."""
        events, self._events = self._events, []
        return events
