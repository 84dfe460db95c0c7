"""Property tests: the block pool's invariants hold under random request traffic.

Invariants checked after every operation:
- ref counts are never negative, and each equals the number of request block
  tables (one per group) that hold the block;
- every non-null block is either in the free queue or referenced, never both;
- the hash map and the blocks' hashes agree, and a cached block a request
  holds carries that request's hash for that position and group;
- once every request is freed, num_blocks - 1 blocks are free.
"""

from __future__ import annotations

from collections import Counter

from core_helpers import make_kv_cache_config, make_request
from hypothesis import given, settings
from hypothesis import strategies as st

from pagoda.core.block_hash import make_block_hash_with_group_id
from pagoda.core.block_pool import BlockPool, KVCacheBlock
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.request import Request


def check_pool(pool: BlockPool) -> None:
    free_ids = {block.block_id for block in pool.free_block_queue.get_all_free_blocks()}
    assert len(free_ids) == pool.get_num_free_blocks()
    assert pool.null_block.block_id not in free_ids and pool.null_block.block_hash is None
    for block in pool.blocks[1:]:
        assert block.ref_cnt >= 0
        assert (block.block_id in free_ids) != (block.ref_cnt > 0), block
    for key, block in pool.cached_block_hash_to_block.items():
        assert block.block_hash == key
    assert sum(block.block_hash is not None for block in pool.blocks) == len(pool.cached_block_hash_to_block)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_block_pool_random_operations(data: st.DataObject) -> None:
    pool = BlockPool(num_blocks=data.draw(st.integers(2, 12)), enable_caching=True)
    held: list[list[KVCacheBlock]] = []
    next_hash = 0
    for _ in range(data.draw(st.integers(1, 40))):
        op = data.draw(st.sampled_from(["get", "free", "cache", "touch"]))
        if op == "get":
            blocks = pool.get_new_blocks(data.draw(st.integers(0, pool.get_num_free_blocks())))
            assert all(block.ref_cnt == 1 and block.block_hash is None for block in blocks)
            held.append(blocks)
        elif op == "free" and held:
            blocks = held.pop(data.draw(st.integers(0, len(held) - 1)))
            pool.free_blocks(reversed(blocks))
        elif op == "cache" and held:
            for block in held[data.draw(st.integers(0, len(held) - 1))]:
                if block.block_hash is None:
                    next_hash += 1
                    key = make_block_hash_with_group_id(next_hash.to_bytes(8, "big"), 0)
                    block.block_hash = key
                    pool.cached_block_hash_to_block[key] = block
        elif op == "touch" and pool.cached_block_hash_to_block:
            keys = sorted(pool.cached_block_hash_to_block)
            chosen = data.draw(st.lists(st.sampled_from(keys), unique=True, max_size=4))
            blocks = [pool.cached_block_hash_to_block[key] for key in chosen]
            pool.touch(blocks)
            held.append(blocks)
        check_pool(pool)
        assert Counter(id(b) for blocks in held for b in blocks) == Counter(
            {id(b): b.ref_cnt for b in pool.blocks if b.ref_cnt}
        )
    for blocks in held:
        pool.free_blocks(reversed(blocks))
    check_pool(pool)
    assert pool.get_num_free_blocks() == pool.num_blocks - 1


class Traffic:
    """Drives a KVCacheManager the way the scheduler does, with random decisions."""

    def __init__(self, manager: KVCacheManager, block_size: int) -> None:
        self.manager = manager
        self.block_size = block_size
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.count = 0

    def add(self, prefix: int, length: int) -> None:
        # A few shared prefixes make prefix-cache hits frequent.
        prompt = [prefix] * 8 + [self.count % 7 + 10] * length
        self.count += 1
        self.waiting.append(make_request(str(self.count), prompt, block_size=self.block_size))

    def admit(self, chunk: int) -> None:
        request = self.waiting[0]
        computed, num_computed = self.manager.get_computed_blocks(request)
        num_new = min(chunk, request.num_tokens - num_computed)
        if self.manager.allocate_slots(request, num_new, num_computed, computed) is not None:
            request.num_computed_tokens = num_computed + num_new
            self.running.append(self.waiting.pop(0))

    def advance(self, index: int, chunk: int) -> None:
        request = self.running[index]
        if request.num_computed_tokens == request.num_tokens:
            request.append_output_token_ids(request.num_tokens % 5)
        num_new = min(chunk, request.num_tokens - request.num_computed_tokens)
        if self.manager.allocate_slots(request, num_new) is None:
            self.preempt(index)
        else:
            request.num_computed_tokens += num_new

    def preempt(self, index: int) -> None:
        request = self.running.pop(index)
        self.manager.free(request)
        request.num_computed_tokens = 0
        self.waiting.insert(0, request)

    def finish(self, index: int) -> None:
        self.manager.free(self.running.pop(index))

    def check(self) -> None:
        pool = self.manager.block_pool
        check_pool(pool)
        holders: Counter[int] = Counter()
        for request in self.running:
            for group_id, blocks in enumerate(self.manager.get_blocks(request.request_id).blocks):
                for index, block in enumerate(blocks):
                    if block.is_null:
                        continue
                    holders[block.block_id] += 1
                    if block.block_hash is not None:
                        expected = make_block_hash_with_group_id(request.block_hashes[index], group_id)
                        assert block.block_hash == expected, (request, index, group_id)
        assert holders == Counter({b.block_id: b.ref_cnt for b in pool.blocks if b.ref_cnt and not b.is_null})


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_kv_cache_manager_random_traffic(data: st.DataObject) -> None:
    block_size = data.draw(st.sampled_from([1, 2, 4]))
    windows = data.draw(st.sampled_from([(), (3,), (5, 9)]))
    num_blocks = data.draw(st.integers(4, 40))
    manager = KVCacheManager(make_kv_cache_config(num_blocks, block_size, windows), max_model_len=10_000)
    traffic = Traffic(manager, block_size)
    for _ in range(data.draw(st.integers(1, 60))):
        op = data.draw(st.sampled_from(["add", "admit", "advance", "finish", "preempt"]))
        chunk = data.draw(st.integers(1, 10))
        if op == "add":
            traffic.add(data.draw(st.integers(0, 2)), data.draw(st.integers(0, 9)))
        elif op == "admit" and traffic.waiting:
            traffic.admit(chunk)
        elif traffic.running:
            index = data.draw(st.integers(0, len(traffic.running) - 1))
            if op == "advance":
                traffic.advance(index, chunk)
            elif op == "finish":
                traffic.finish(index)
            elif op == "preempt":
                traffic.preempt(index)
        traffic.check()
    for request in list(traffic.running):
        manager.free(request)
    check_pool(manager.block_pool)
    assert manager.get_num_free_blocks() == num_blocks - 1
