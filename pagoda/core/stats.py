"""Core layer: snapshots of scheduler and prefix-cache counters for metrics and logging."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PrefixCacheStats:
    """Prefix-cache lookups over an interval, counted in tokens."""

    requests: int = 0  # lookups made
    queries: int = 0  # tokens looked up
    hits: int = 0  # tokens found cached

    def __add__(self, other: PrefixCacheStats) -> PrefixCacheStats:
        return PrefixCacheStats(self.requests + other.requests, self.queries + other.queries, self.hits + other.hits)


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    """The scheduler's state now; the prefix-cache and preemption counts are cumulative."""

    num_running_reqs: int
    num_waiting_reqs: int
    kv_cache_usage: float  # fraction of usable blocks referenced
    num_free_blocks: int
    num_blocks: int  # as in KVCacheConfig: includes the null block
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
