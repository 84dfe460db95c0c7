"""KVCacheManager and BlockPool with a single full-attention group: exact block ids and free-queue order.

Block size 4 and 11 blocks throughout: block 0 is the null block, so the
free queue starts as [1 .. 10].
"""

from __future__ import annotations

from core_helpers import free_queue_ids, make_kv_cache_config, make_request

from pagoda.core.block_hash import make_block_hash_with_group_id
from pagoda.core.kv_cache_events import AllBlocksCleared, BlockRemoved, BlockStored
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.request import Request


def make_manager(num_blocks: int = 11, enable_caching: bool = True, **kwargs: bool) -> KVCacheManager:
    config = make_kv_cache_config(num_blocks)
    return KVCacheManager(config, max_model_len=1024, enable_caching=enable_caching, **kwargs)


def admit(manager: KVCacheManager, request: Request, num_new_tokens: int | None = None) -> list[int]:
    """What the scheduler does for a waiting request; returns the new block ids of group 0."""
    computed, num_computed = manager.get_computed_blocks(request)
    if num_new_tokens is None:
        num_new_tokens = request.num_tokens - num_computed
    new_blocks = manager.allocate_slots(request, num_new_tokens, num_computed, computed)
    assert new_blocks is not None
    request.num_computed_tokens = num_computed + num_new_tokens
    return new_blocks.get_block_ids()[0]


def ref_cnts(manager: KVCacheManager, block_ids: list[int]) -> list[int]:
    return [manager.block_pool.blocks[i].ref_cnt for i in block_ids]


def test_prefill_then_prefix_hit_shares_blocks() -> None:
    manager = make_manager()
    shared = list(range(12))  # three full blocks
    req0 = make_request("0", shared + [100, 101, 102])
    computed, num_computed = manager.get_computed_blocks(req0)
    assert num_computed == 0 and computed.get_block_ids() == ([],)
    assert admit(manager, req0) == [1, 2, 3, 4]
    pool = manager.block_pool
    for block_id, block_hash in zip([1, 2, 3], req0.block_hashes):
        assert pool.blocks[block_id].block_hash == make_block_hash_with_group_id(block_hash, 0)
    assert pool.blocks[4].block_hash is None  # partial block: not cached
    assert free_queue_ids(pool) == [5, 6, 7, 8, 9, 10]

    req1 = make_request("1", shared + [200, 201])
    computed, num_computed = manager.get_computed_blocks(req1)
    assert computed.get_block_ids() == ([1, 2, 3],) and num_computed == 12
    assert manager.allocate_slots(req1, 2, num_computed, computed).get_block_ids() == ([5],)
    assert manager.get_block_ids("1") == ([1, 2, 3, 5],)
    assert ref_cnts(manager, [1, 2, 3, 4, 5]) == [2, 2, 2, 1, 1]

    manager.free(req0)
    assert ref_cnts(manager, [1, 2, 3, 4]) == [1, 1, 1, 0]
    assert free_queue_ids(pool) == [6, 7, 8, 9, 10, 4]
    manager.free(req1)
    # Tail first: block 5, then the shared blocks from the end.
    assert free_queue_ids(pool) == [6, 7, 8, 9, 10, 4, 5, 3, 2, 1]
    assert manager.get_num_free_blocks() == 10


def test_freed_blocks_keep_their_hash_and_are_revived() -> None:
    manager = make_manager()
    prompt = list(range(12)) + [7]
    req0 = make_request("0", prompt)
    admit(manager, req0)
    manager.free(req0)
    pool = manager.block_pool
    assert free_queue_ids(pool) == [5, 6, 7, 8, 9, 10, 4, 3, 2, 1]
    assert all(pool.blocks[i].block_hash is not None for i in (1, 2, 3))

    req1 = make_request("1", prompt)
    computed, num_computed = manager.get_computed_blocks(req1)
    assert computed.get_block_ids() == ([1, 2, 3],) and num_computed == 12
    assert manager.allocate_slots(req1, 1, num_computed, computed).get_block_ids() == ([5],)
    # Revived blocks left the free queue; their hashes are those of the new request.
    assert free_queue_ids(pool) == [6, 7, 8, 9, 10, 4]
    assert ref_cnts(manager, [1, 2, 3]) == [1, 1, 1]
    for block_id, block_hash in zip([1, 2, 3], req1.block_hashes):
        assert pool.blocks[block_id].block_hash == make_block_hash_with_group_id(block_hash, 0)


def test_full_prompt_hit_leaves_one_token_to_compute() -> None:
    manager = make_manager()
    prompt = list(range(12))
    admit(manager, make_request("0", prompt))
    req1 = make_request("1", prompt)
    computed, num_computed = manager.get_computed_blocks(req1)
    # All 12 tokens are cached, but the last one must run to produce logits.
    assert num_computed == 8 and computed.get_block_ids() == ([1, 2],)


def test_lru_eviction_takes_the_tail_of_a_freed_request_first() -> None:
    manager = make_manager()
    req_a = make_request("a", list(range(12)) + [99])
    assert admit(manager, req_a) == [1, 2, 3, 4]
    manager.free(req_a)
    pool = manager.block_pool
    assert free_queue_ids(pool) == [5, 6, 7, 8, 9, 10, 4, 3, 2, 1]

    # 8 blocks: the never-used ones, then block 4 (uncached) and block 3 (a's tail, evicted).
    req_b = make_request("b", list(range(500, 532)))
    assert admit(manager, req_b) == [5, 6, 7, 8, 9, 10, 4, 3]
    assert free_queue_ids(pool) == [2, 1]
    assert pool.blocks[3].block_hash == make_block_hash_with_group_id(req_b.block_hashes[7], 0)

    req_c = make_request("c", list(range(12)) + [99])
    computed, num_computed = manager.get_computed_blocks(req_c)
    assert computed.get_block_ids() == ([1, 2],) and num_computed == 8


def test_allocation_fails_cleanly_when_the_pool_is_short() -> None:
    manager = make_manager(num_blocks=5)  # 4 usable blocks
    req0 = make_request("0", list(range(12)))
    admit(manager, req0)  # 3 blocks
    req1 = make_request("1", list(range(100, 108)))
    computed, num_computed = manager.get_computed_blocks(req1)
    assert manager.allocate_slots(req1, 8, num_computed, computed) is None
    assert manager.get_num_free_blocks() == 1 and manager.get_block_ids("1") == ([],)
    assert manager.allocate_slots(req1, 4, num_computed, computed).get_block_ids() == ([4],)


def test_hits_in_the_free_queue_count_against_free_blocks() -> None:
    manager = make_manager(num_blocks=5)  # 4 usable blocks
    prompt = list(range(12)) + [1]
    req0 = make_request("0", prompt)
    admit(manager, req0)  # blocks 1-4, three of them cached
    manager.free(req0)
    req1 = make_request("1", prompt + [2, 3, 4, 5, 6, 7, 8])  # 5 blocks: 3 hits + 2 new
    computed, num_computed = manager.get_computed_blocks(req1)
    assert num_computed == 12
    # Reviving three hits and allocating two new blocks needs 5 of the 4 free blocks.
    assert manager.allocate_slots(req1, 8, num_computed, computed) is None
    assert manager.get_num_free_blocks() == 4 and all(b.ref_cnt == 0 for b in manager.block_pool.blocks)


def test_decode_caches_blocks_as_they_fill() -> None:
    manager = make_manager()
    request = make_request("0", [1, 2, 3, 4, 5, 6])
    assert admit(manager, request) == [1, 2]
    pool = manager.block_pool
    assert pool.blocks[2].block_hash is None
    request.append_output_token_ids(7)
    assert manager.allocate_slots(request, 1).get_block_ids() == ([],)
    request.num_computed_tokens += 1
    request.append_output_token_ids(8)  # tokens 0-7 now fill block 2
    assert len(request.block_hashes) == 2
    assert manager.allocate_slots(request, 1).get_block_ids() == ([],)
    assert pool.blocks[2].block_hash == make_block_hash_with_group_id(request.block_hashes[1], 0)
    request.num_computed_tokens += 1
    request.append_output_token_ids(9)
    assert manager.allocate_slots(request, 1).get_block_ids() == ([3],)


def test_cache_salt_isolates_tenants() -> None:
    manager = make_manager()
    prompt = list(range(12)) + [5]
    admit(manager, make_request("a", prompt, cache_salt="alice"))
    assert manager.get_computed_blocks(make_request("b", prompt, cache_salt="bob"))[1] == 0
    assert manager.get_computed_blocks(make_request("c", prompt))[1] == 0
    assert manager.get_computed_blocks(make_request("d", prompt, cache_salt="alice"))[1] == 12


def test_xxhash_requests_hit_too() -> None:
    manager = make_manager()
    prompt = list(range(12)) + [5]
    admit(manager, make_request("a", prompt, hash_algo="xxhash"))
    computed, num_computed = manager.get_computed_blocks(make_request("b", prompt, hash_algo="xxhash"))
    assert num_computed == 12 and computed.get_block_ids() == ([1, 2, 3],)


def test_no_hits_for_prompt_logprobs_or_disabled_caching() -> None:
    manager = make_manager()
    prompt = list(range(12)) + [5]
    admit(manager, make_request("a", prompt))
    assert manager.get_computed_blocks(make_request("b", prompt, prompt_logprobs=1))[1] == 0

    off = make_manager(enable_caching=False)
    admit(off, make_request("a", prompt))
    assert off.get_computed_blocks(make_request("b", prompt)) == (off.empty_kv_cache_blocks, 0)
    assert all(block.block_hash is None for block in off.block_pool.blocks)


def test_concurrent_duplicate_blocks_stay_uncached() -> None:
    manager = make_manager()
    prompt = list(range(8)) + [1]
    req0, req1 = make_request("0", prompt), make_request("1", prompt)
    hits0, hits1 = manager.get_computed_blocks(req0), manager.get_computed_blocks(req1)
    assert manager.allocate_slots(req0, 9, hits0[1], hits0[0]).get_block_ids() == ([1, 2, 3],)
    assert manager.allocate_slots(req1, 9, hits1[1], hits1[0]).get_block_ids() == ([4, 5, 6],)
    pool = manager.block_pool
    assert pool.blocks[1].block_hash is not None and pool.blocks[4].block_hash is None
    assert len(pool.cached_block_hash_to_block) == 2


def test_prefix_cache_stats_count_tokens() -> None:
    manager = make_manager(log_stats=True)
    prompt = list(range(12)) + [5]
    admit(manager, make_request("a", prompt))
    admit(manager, make_request("b", prompt + [6, 7]))
    stats = manager.make_prefix_cache_stats()
    assert (stats.requests, stats.queries, stats.hits) == (2, 13 + 15, 12)
    assert manager.make_prefix_cache_stats().queries == 0  # reset by the previous call
    assert make_manager().make_prefix_cache_stats() is None  # stats off


def test_reset_prefix_cache_only_when_idle() -> None:
    manager = make_manager(enable_kv_cache_events=True)
    request = make_request("a", list(range(12)) + [5])
    admit(manager, request)
    assert manager.reset_prefix_cache() is False
    manager.free(request)
    assert manager.reset_prefix_cache() is True
    assert manager.block_pool.cached_block_hash_to_block == {}
    assert all(block.block_hash is None for block in manager.block_pool.blocks)
    assert manager.get_computed_blocks(make_request("b", list(range(12)) + [5]))[1] == 0
    assert manager.take_events()[-1] == AllBlocksCleared()


def test_kv_cache_events() -> None:
    manager = make_manager(num_blocks=5, enable_kv_cache_events=True)
    req0 = make_request("0", list(range(9)))
    admit(manager, req0)
    assert manager.take_events() == [
        BlockStored(tuple(req0.block_hashes), None, tuple(range(8)), 4, 0),
    ]
    assert manager.take_events() == []
    manager.free(req0)  # free queue: [4, 3, 2, 1]
    req1 = make_request("1", list(range(100, 110)))
    assert admit(manager, req1) == [4, 3, 2]  # block 2 held req0's second block
    assert manager.take_events() == [
        BlockRemoved((req0.block_hashes[1],), 0),
        BlockStored(tuple(req1.block_hashes), None, tuple(range(100, 108)), 4, 0),
    ]
    quiet = make_manager()
    admit(quiet, make_request("0", list(range(9))))
    assert quiet.take_events() == []  # events off: nothing is collected


def test_usage() -> None:
    manager = make_manager()
    assert manager.usage == 0.0
    admit(manager, make_request("0", list(range(20))))
    assert manager.usage == 0.5
