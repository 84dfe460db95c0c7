"""Sliding-window groups: freeing blocks that left the window, right-to-left lookup, hybrid hits."""

from __future__ import annotations

import pytest
from core_helpers import cache_block, free_queue_ids, full_spec, make_request, sliding_spec

from pagoda.core.block_hash import make_block_hash_with_group_id
from pagoda.core.block_pool import BlockPool
from pagoda.core.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec, make_kv_cache_config
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.single_type_managers import SlidingWindowManager, cdiv


def lookup(cached: set[int], num_hashes: int, max_length: int) -> list[int]:
    """Block size 2, window 4 (two blocks needed); returns the hit's block ids (0 = null)."""
    pool = BlockPool(num_blocks=20, enable_caching=True)
    hashes = [bytes([i]) * 4 for i in range(num_hashes)]
    for index in cached:
        cache_block(pool, pool.blocks[index + 1], make_block_hash_with_group_id(hashes[index], 0))
    (hits,) = SlidingWindowManager.find_longest_cache_hit(hashes, max_length, [0], pool, sliding_spec(2, 4))
    return [block.block_id for block in hits]


@pytest.mark.parametrize(
    ("cached", "num_hashes", "max_length", "expected"),
    [
        ({0, 1, 2, 3, 4, 5}, 6, 100, [0, 0, 0, 0, 5, 6]),  # only the window's blocks are kept
        ({0, 1, 2, 3, 4, 5}, 6, 7, [0, 2, 3]),  # max_length cuts it to 3 blocks
        ({0, 1, 3, 4, 6}, 7, 100, [0, 0, 0, 4, 5]),  # block 5 misses: the hit ends before it
        ({2, 3}, 4, 100, [0, 0, 3, 4]),  # earlier blocks need not be cached at all
        ({0}, 5, 100, [1]),  # a run that reaches the start counts even if short
        ({1, 3}, 4, 100, []),
        (set(), 4, 100, []),
    ],
)
def test_sliding_window_lookup(cached: set[int], num_hashes: int, max_length: int, expected: list[int]) -> None:
    assert lookup(cached, num_hashes, max_length) == expected


def sliding_manager(num_blocks: int = 30, window: int = 8, block_size: int = 4) -> KVCacheManager:
    spec = sliding_spec(block_size, window)
    config = make_kv_cache_config([spec], memory_bytes=num_blocks * spec.page_size_bytes)
    return KVCacheManager(config, max_model_len=10_000)


def test_blocks_outside_the_window_become_null_and_are_freed() -> None:
    manager = sliding_manager()
    request = make_request("r", list(range(16)))
    assert manager.allocate_slots(request, 16).get_block_ids() == ([1, 2, 3, 4],)
    request.num_computed_tokens = 16
    request.append_output_token_ids(5)
    # Next token at position 16 sees positions 9..16: blocks 0 and 1 (tokens 0-7) are done with.
    assert manager.allocate_slots(request, 1).get_block_ids() == ([5],)
    assert manager.get_block_ids("r") == ([0, 0, 3, 4, 5],)
    pool = manager.block_pool
    assert free_queue_ids(pool)[-2:] == [2, 1]  # freed tail first
    assert pool.blocks[1].ref_cnt == 0 and pool.blocks[1].block_hash is not None  # still revivable
    manager.free(request)
    assert manager.get_num_free_blocks() == pool.num_blocks - 1


def test_a_long_request_holds_about_a_window_of_blocks() -> None:
    window, block_size, chunk = 8, 4, 8
    manager = sliding_manager(window=window, block_size=block_size)
    request = make_request("r", list(range(40)))
    while request.num_computed_tokens < request.num_tokens or request.num_output_tokens < 30:
        if request.num_computed_tokens == request.num_tokens:
            request.append_output_token_ids(request.num_tokens % 50)
        num_new = min(chunk, request.num_tokens - request.num_computed_tokens)
        assert manager.allocate_slots(request, num_new) is not None
        held = [b for b in manager.get_blocks("r").blocks[0] if not b.is_null]
        assert len(held) <= cdiv(window - 1, block_size) + 1 + cdiv(num_new, block_size)
        request.num_computed_tokens += num_new
    assert request.num_tokens == 70 and len(manager.get_block_ids("r")[0]) == cdiv(70, block_size)


def gemma_like_layers(window: int, block_size: int = 4) -> list[FullAttentionSpec]:
    """18 layers, every sixth full attention, the rest sliding window (Gemma 3's pattern)."""
    full = full_spec(block_size)
    sliding = sliding_spec(block_size, window)
    return [full if (layer + 1) % 6 == 0 else sliding for layer in range(18)]


def hybrid_manager(num_blocks: int = 200) -> KVCacheManager:
    layers = gemma_like_layers(window=8)
    config = make_kv_cache_config(layers, memory_bytes=num_blocks * 3 * layers[0].page_size_bytes)
    assert config.num_blocks == num_blocks and len(config.groups) == 6
    assert type(config.groups[0].spec) is FullAttentionSpec
    assert all(isinstance(group.spec, SlidingWindowSpec) for group in config.groups[1:])
    return KVCacheManager(config, max_model_len=10_000)


def test_hybrid_hit_is_valid_for_every_group() -> None:
    manager = hybrid_manager()
    prompt = list(range(40))
    first = make_request("a", prompt)
    first_ids = manager.allocate_slots(first, 40).get_block_ids()
    assert len(set(sum(first_ids, []))) == 60  # every group has its own blocks
    manager.free(first)

    second = make_request("b", prompt + [1, 2, 3, 4, 5])
    computed, num_computed = manager.get_computed_blocks(second)
    assert num_computed == 40
    full_ids, *sliding_ids = computed.get_block_ids()
    assert full_ids == first_ids[0]
    for ids, group_first_ids in zip(sliding_ids, first_ids[1:]):
        assert ids == [0] * 8 + group_first_ids[8:]


def test_hybrid_hit_shrinks_to_a_fixed_point() -> None:
    manager = hybrid_manager()
    prompt = list(range(40))
    first = make_request("a", prompt)
    blocks = manager.allocate_slots(first, 40).blocks
    manager.free(first)
    # Evict block 9 of sliding group 2 only: that group's window now ends at block 8.
    pool = manager.block_pool
    evicted = blocks[2][9]
    del pool.cached_block_hash_to_block[evicted.block_hash]
    evicted.block_hash = None

    second = make_request("b", prompt + [1, 2, 3, 4, 5])
    computed, num_computed = manager.get_computed_blocks(second)
    assert num_computed == 36
    full_ids, *sliding_ids = computed.get_block_ids()
    assert full_ids == [block.block_id for block in blocks[0][:9]]
    for group, ids in enumerate(sliding_ids, start=1):
        assert ids == [0] * 7 + [block.block_id for block in blocks[group][7:9]]
    assert manager.allocate_slots(second, 9, num_computed, computed) is not None
    assert [len(ids) for ids in manager.get_block_ids("b")] == [12] * 6


def test_hybrid_fixed_point_with_two_windows() -> None:
    """A shorter hit for one window may be invalid for another; the lookup must iterate."""
    block_size = 2
    full, small, large = full_spec(block_size), sliding_spec(block_size, 3), sliding_spec(block_size, 5)
    config = make_kv_cache_config([full, small, large], memory_bytes=100 * full.page_size_bytes)
    manager = KVCacheManager(config, max_model_len=1000)
    request = make_request("a", list(range(20)), block_size=block_size)
    hashes = request.block_hashes
    pool = manager.block_pool
    next_id = iter(range(1, 100))
    # Full: blocks 0-9 cached. Small window (1 block needed): all but 5 and 8. Large (2 blocks): all but 6.
    for group_id, missing in ((0, ()), (1, (5, 8)), (2, (6,))):
        for index in range(10):
            if index not in missing:
                cache_block(pool, pool.blocks[next(next_id)], make_block_hash_with_group_id(hashes[index], group_id))
    computed, num_computed = manager.get_computed_blocks(request)
    # Pass 1: full gives 9 blocks (max 19 tokens), small 8 (block 8 missing), large 6
    # (block 6 missing). Pass 2: small at 6 blocks misses block 5 and drops to 5; large
    # at 5 holds. Pass 3 changes nothing: 5 blocks for every group.
    assert num_computed == 10
    full_ids, small_ids, large_ids = computed.get_block_ids()
    assert len(full_ids) == len(small_ids) == len(large_ids) == 5
    assert 0 not in full_ids
    assert small_ids[:4] == [0] * 4 and small_ids[4] != 0
    assert large_ids[:3] == [0] * 3 and 0 not in large_ids[3:]
