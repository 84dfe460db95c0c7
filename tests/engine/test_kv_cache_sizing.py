"""The default KV cache holds what max_num_seqs x max_model_len can use, within the workers' offer."""

from __future__ import annotations

from pagoda.config import CacheConfig, SchedulerConfig
from pagoda.core.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec
from pagoda.engine.kv_cache_sizing import size_kv_cache

FULL = FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=64, dtype_size=2)
SLIDING = SlidingWindowSpec(block_size=16, num_kv_heads=1, head_size=64, dtype_size=2, sliding_window=128)
SPECS = [FULL, SLIDING, SLIDING]  # groups: one full, two sliding, one layer each
BLOCK_BYTES = FULL.page_size_bytes


def test_small_limits_get_a_small_cache() -> None:
    scheduler = SchedulerConfig(max_num_seqs=4, max_model_len=1024, max_num_batched_tokens=256)
    sizing = size_kv_cache(SPECS, 1 << 30, CacheConfig(), scheduler)
    # Per request: 64 full blocks + 2 x (window 8 + 1 + chunk 16) sliding blocks; plus the null block.
    assert sizing.config.num_blocks == 4 * (64 + 2 * 25) + 1
    assert "max_num_seqs=4" in sizing.reason and "max_model_len=1024" in sizing.reason


def test_large_limits_are_capped_by_the_workers_offer() -> None:
    scheduler = SchedulerConfig(max_num_seqs=256, max_model_len=8192)
    offer = 1000 * BLOCK_BYTES
    sizing = size_kv_cache(SPECS, offer, CacheConfig(), scheduler)
    assert sizing.config.num_blocks == 1000
    assert "free memory" in sizing.reason


def test_explicit_kv_cache_memory_wins() -> None:
    scheduler = SchedulerConfig(max_num_seqs=1, max_model_len=64)
    sizing = size_kv_cache(SPECS, 10 * BLOCK_BYTES, CacheConfig(kv_cache_memory=5000 * BLOCK_BYTES), scheduler)
    assert sizing.config.num_blocks == 5000
    assert sizing.reason == "kv_cache_memory as configured"


def test_pipeline_stages_size_the_cache_by_the_fullest_stage() -> None:
    # Four full-attention layers in one group of four tensors: each of 2 stages allocates two, so the same
    # bytes per rank hold twice the blocks; 3 stages split the layers 2 + 1 + 1 and the first holds two.
    specs = [FULL] * 4
    memory = CacheConfig(kv_cache_memory=1000 * 4 * BLOCK_BYTES)
    scheduler = SchedulerConfig(max_num_seqs=1, max_model_len=64)
    assert size_kv_cache(specs, 0, memory, scheduler).config.num_blocks == 1000
    assert size_kv_cache(specs, 0, memory, scheduler, num_stages=2).config.num_blocks == 2000
    assert size_kv_cache(specs, 0, memory, scheduler, num_stages=3).config.num_blocks == 2000
    # Layers of one stage sharing one position across groups: no saving to be had.
    shared = size_kv_cache(SPECS, 0, CacheConfig(kv_cache_memory=3000 * BLOCK_BYTES), scheduler, num_stages=3)
    assert shared.config.num_blocks == size_kv_cache(SPECS, 0, CacheConfig(kv_cache_memory=3000 * BLOCK_BYTES),
                                                     scheduler).config.num_blocks
