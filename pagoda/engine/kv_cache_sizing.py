"""Engine layer: how many KV blocks the engine allocates, and why.

An explicit `kv_cache_memory` is used as given. Otherwise the cache gets what
the configured limits can use — `max_num_seqs` requests of `max_model_len`
tokens at their peak — but no more than the workers offer (a fraction of
free memory, capped on the host). A small `max_model_len` or `max_num_seqs`
thus gets a small cache instead of gigabytes no request could fill.
Either budget is per rank: a pipeline stage allocates only the KV tensors its
own layers use, so the blocks are as many as the fullest stage can hold.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagoda.config import CacheConfig, SchedulerConfig
from pagoda.core.kv_cache_interface import KVCacheConfig, KVCacheSpec, SlidingWindowSpec, make_kv_cache_config
from pagoda.models.pipeline_stages import stage_layers


@dataclass(frozen=True)
class KVCacheSizing:
    config: KVCacheConfig
    reason: str  # for the start-up log line


def blocks_per_request(kv_cache_config: KVCacheConfig, num_tokens: int, max_chunk_tokens: int) -> int:
    """Blocks one request of `num_tokens` holds at its peak, over all groups.

    A sliding-window group holds the window plus the chunk being computed.
    """
    total = 0
    for group in kv_cache_config.groups:
        spec = group.spec
        blocks = -(-num_tokens // spec.block_size)
        if isinstance(spec, SlidingWindowSpec):
            window = -(-(spec.sliding_window - 1) // spec.block_size) + 1
            blocks = min(blocks, window + -(-max_chunk_tokens // spec.block_size))
        total += blocks
    return total


def size_kv_cache(layer_specs: list[KVCacheSpec], available_bytes: int, cache_config: CacheConfig,
                  scheduler_config: SchedulerConfig, num_stages: int = 1) -> KVCacheSizing:
    """The block pool for `available_bytes` offered by each worker, or for an explicit `kv_cache_memory`
    per worker; `num_stages`: pipeline stages the layers are split over."""
    if cache_config.kv_cache_memory is not None:
        return KVCacheSizing(_config_for(layer_specs, cache_config.kv_cache_memory, num_stages),
                             "kv_cache_memory as configured")
    probe = _config_for(layer_specs, available_bytes, num_stages)
    per_request = blocks_per_request(probe, scheduler_config.max_model_len, scheduler_config.max_num_batched_tokens)
    usable_blocks = scheduler_config.max_num_seqs * per_request + 1  # + the null block
    if usable_blocks < probe.num_blocks:
        config = KVCacheConfig(num_blocks=usable_blocks, groups=probe.groups)
        return KVCacheSizing(config, f"what max_num_seqs={scheduler_config.max_num_seqs} requests of "
                                     f"max_model_len={scheduler_config.max_model_len} tokens can use")
    return KVCacheSizing(probe, f"the workers' default share of free memory (max_num_seqs="
                                f"{scheduler_config.max_num_seqs} x max_model_len={scheduler_config.max_model_len} "
                                f"could use {usable_blocks * probe.bytes_per_block / 2**30:.1f} GiB)")


def _config_for(layer_specs: list[KVCacheSpec], bytes_per_rank: int, num_stages: int) -> KVCacheConfig:
    """As many blocks as `bytes_per_rank` holds on the stage that allocates the most KV tensors."""
    whole = make_kv_cache_config(layer_specs, bytes_per_rank)
    if num_stages == 1:
        return whole
    fullest = max(len(whole.positions_used_by(stage_layers(len(layer_specs), stage, num_stages)))
                  for stage in range(num_stages))
    return make_kv_cache_config(layer_specs, bytes_per_rank * whole.num_kv_tensors // fullest)
