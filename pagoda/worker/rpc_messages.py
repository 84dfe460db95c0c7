"""Worker layer: what the multiprocess executor and its worker processes say to each other.

msgspec Structs over the shared-memory queues (`pagoda.distributed.shm_broadcast`),
never pickle: a call names the worker method and carries its one typed
argument, if any; the answer carries the result msgpack-encoded (the executor
knows each method's result type) or the error that ended the worker.
"""

from __future__ import annotations

import msgspec

from pagoda.core.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheSpec,
    SlidingWindowSpec,
)
from pagoda.core.scheduler_output import SchedulerOutput
from pagoda.distributed.shm_broadcast import MessageQueueHandle


class WireSpec(msgspec.Struct, array_like=True, frozen=True):
    """A layer's KV cache spec on the wire (the spec dataclasses form a hierarchy msgpack cannot tell apart)."""

    block_size: int
    num_kv_heads: int
    head_size: int
    dtype_size: int
    sliding_window: int | None = None

    @classmethod
    def of(cls, spec: KVCacheSpec) -> WireSpec:
        window = spec.sliding_window if isinstance(spec, SlidingWindowSpec) else None
        return cls(spec.block_size, spec.num_kv_heads, spec.head_size, spec.dtype_size, window)

    def to_spec(self) -> KVCacheSpec:
        common = dict(block_size=self.block_size, num_kv_heads=self.num_kv_heads, head_size=self.head_size,
                      dtype_size=self.dtype_size)
        if self.sliding_window is None:
            return FullAttentionSpec(**common)
        return SlidingWindowSpec(**common, sliding_window=self.sliding_window)


class WireKVCacheConfig(msgspec.Struct, array_like=True, frozen=True):
    num_blocks: int
    groups: list[tuple[list[int], WireSpec]]

    @classmethod
    def of(cls, config: KVCacheConfig) -> WireKVCacheConfig:
        return cls(config.num_blocks, [(list(g.layer_indices), WireSpec.of(g.spec)) for g in config.groups])

    def to_config(self) -> KVCacheConfig:
        return KVCacheConfig(self.num_blocks, tuple(KVCacheGroupSpec(tuple(layers), spec.to_spec())
                                                    for layers, spec in self.groups))


class RpcCall(msgspec.Struct, kw_only=True):
    method: str
    # The one argument of the methods that take one.
    scheduler_output: SchedulerOutput | None = None
    kv_cache_config: WireKVCacheConfig | None = None
    # Only this rank answers (None: every rank does).
    reply_rank: int | None = None


class RpcResult(msgspec.Struct, kw_only=True):
    rank: int
    result: bytes = b""  # msgpack of the method's return value
    error: str | None = None


class WorkerReady(msgspec.Struct, kw_only=True):
    """A worker's first message (on its ready pipe): where it answers, or why it could not start."""

    responses: MessageQueueHandle | None = None
    error: str | None = None
