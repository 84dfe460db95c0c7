"""Core layer: events the block pool emits so an external index can mirror the prefix cache."""

from __future__ import annotations

from dataclasses import dataclass

from pagoda.core.block_hash import BlockHash


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Consecutive full blocks of one request became cached in one group."""

    block_hashes: tuple[BlockHash, ...]
    parent_block_hash: BlockHash | None  # None: the first block stored is a sequence's first
    token_ids: tuple[int, ...]  # the tokens of all stored blocks, in order
    block_size: int
    group_id: int


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """A cached block was evicted (its hash dropped) to be reused."""

    block_hashes: tuple[BlockHash, ...]
    group_id: int


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The whole prefix cache was reset."""


KVCacheEvent = BlockStored | BlockRemoved | AllBlocksCleared
