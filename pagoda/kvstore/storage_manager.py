"""KV store layer: the ordered tiers of the store, with write-through, promotion and prefix lookup.

Tier 0 is the fastest (CPU memory). A put encodes the entry once and writes
it through to every tier; a get takes the first tier that has the key,
checks the bytes, and promotes a lower-tier hit to tier 0 so the next read is
fast. A tier that raises a storage error is skipped for that call: the
caller sees a miss and recomputes, it never sees an exception or bad bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np

from pagoda.kvstore.entry import (
    CorruptEntryError,
    DecodedEntry,
    decode_entry,
    encode_entry,
)
from pagoda.kvstore.keys import CacheEngineKey
from pagoda.kvstore.tiers.base import StorageTier, TierMetrics

logger = logging.getLogger(__name__)

__all__ = ["StorageManager", "TierMetrics"]


class StorageManager:
    def __init__(self, tiers: Sequence[StorageTier]) -> None:
        if not tiers:
            raise ValueError("tiers must name at least one storage tier")
        self.tiers = list(tiers)

    def metrics(self) -> dict[str, TierMetrics]:
        """Each tier's counters by tier name (live objects, not copies)."""
        return {tier.name: tier.metrics for tier in self.tiers}

    def put(
        self,
        key: CacheEngineKey,
        data: np.ndarray | bytes | bytearray | memoryview,
        shape: tuple[int, ...],
        dtype: str,
    ) -> int:
        """Store one chunk's KV in every tier; returns how many tiers accepted it."""
        entry = encode_entry(key, data, shape, dtype)
        num_accepted = 0
        for tier in self.tiers:
            if self._put_into(tier, key, entry):
                num_accepted += 1
        return num_accepted

    def get(self, key: CacheEngineKey) -> DecodedEntry | None:
        """The checked entry from the first tier holding it, promoted to tier 0; None on a miss."""
        for level, tier in enumerate(self.tiers):
            tier.metrics.lookups += 1
            try:
                entry = tier.get(key)
            except OSError as exc:
                logger.warning("KV store: tier %s failed a read (%s); treating it as a miss", tier.name, exc)
                continue
            if entry is None:
                continue
            try:
                decoded = decode_entry(entry, key)
            except CorruptEntryError as exc:
                logger.warning("KV store: tier %s returned a corrupt entry (%s); dropping it", tier.name, exc)
                tier.metrics.corrupt_dropped += 1
                self._remove_from(tier, key)
                continue
            tier.metrics.hits += 1
            tier.metrics.bytes_out += len(entry)
            if level > 0:
                self._put_into(self.tiers[0], key, entry)
            return decoded
        return None

    def contains(self, key: CacheEngineKey) -> bool:
        return any(self._tier_contains(tier, key) for tier in self.tiers)

    def lookup_prefix(self, keys: Iterable[CacheEngineKey]) -> int:
        """Number of leading keys present in some tier; stops at the first key no tier has.

        Keys past a gap are never asked about: a chunk's KV is useless
        without the KV of every chunk before it.
        """
        num_present = 0
        for key in keys:
            if not self.contains(key):
                break
            num_present += 1
        return num_present

    def remove(self, key: CacheEngineKey) -> int:
        """Remove a key from every tier; returns how many tiers dropped it."""
        return sum(self._remove_from(tier, key) for tier in self.tiers)

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()

    @staticmethod
    def _put_into(tier: StorageTier, key: CacheEngineKey, entry: bytes) -> bool:
        try:
            accepted = tier.put(key, entry)
        except OSError as exc:
            logger.warning("KV store: tier %s failed a write (%s); the entry is not stored there", tier.name, exc)
            tier.metrics.failed_puts += 1
            return False
        if accepted:
            tier.metrics.bytes_in += len(entry)
        return accepted

    @staticmethod
    def _tier_contains(tier: StorageTier, key: CacheEngineKey) -> bool:
        try:
            return tier.contains(key)
        except OSError:
            return False

    @staticmethod
    def _remove_from(tier: StorageTier, key: CacheEngineKey) -> bool:
        try:
            return tier.remove(key)
        except OSError:
            return False
