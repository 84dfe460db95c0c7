"""KV store layer: the local CPU memory tier, a hard byte budget with ref and pin counts.

An entry with a nonzero ref count (being read through `read`) or pin count
(held by a caller, e.g. a load scheduled but not yet started) is never
evicted or removed. A put that cannot free enough unreferenced, unpinned
bytes is refused, so the budget is never exceeded, even briefly.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from pagoda.kvstore.keys import CacheEngineKey
from pagoda.kvstore.policies import make_policy
from pagoda.kvstore.tiers.base import StorageTier


class CPUTier(StorageTier):
    name = "cpu"
    is_local = True
    supports_async_put = False

    def __init__(self, capacity_bytes: int, policy: str = "lru") -> None:
        super().__init__()
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._policy = make_policy(policy)
        self._entries: dict[CacheEngineKey, bytes] = {}
        self._used_bytes = 0
        self._ref_counts: dict[CacheEngineKey, int] = {}
        self._pin_counts: dict[CacheEngineKey, int] = {}
        # Loads and saves may run on other threads than lookups.
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    def __len__(self) -> int:
        return len(self._entries)

    def contains(self, key: CacheEngineKey) -> bool:
        return key in self._entries

    def get(self, key: CacheEngineKey) -> bytes | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._policy.on_access(key)
            return entry

    @contextmanager
    def read(self, key: CacheEngineKey) -> Iterator[memoryview | None]:
        """A view of the entry, protected from eviction until the block exits; None when absent."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._ref_counts[key] = self._ref_counts.get(key, 0) + 1
                self._policy.on_access(key)
        try:
            yield None if entry is None else memoryview(entry)
        finally:
            if entry is not None:
                with self._lock:
                    self._decrement(self._ref_counts, key)

    def pin(self, key: CacheEngineKey) -> bool:
        """Protect an entry from eviction until `unpin`; False when absent."""
        with self._lock:
            if key not in self._entries:
                return False
            self._pin_counts[key] = self._pin_counts.get(key, 0) + 1
            return True

    def unpin(self, key: CacheEngineKey) -> None:
        with self._lock:
            self._decrement(self._pin_counts, key)

    def is_evictable(self, key: CacheEngineKey) -> bool:
        return key not in self._ref_counts and key not in self._pin_counts

    def put(self, key: CacheEngineKey, entry: bytes) -> bool:
        with self._lock:
            if key in self._entries:
                # Equal keys name identical KV (the key is a content hash): nothing to write.
                self._policy.on_put(key)
                return True
            if not self._make_room(len(entry)):
                self.metrics.failed_puts += 1
                return False
            self._entries[key] = entry
            self._used_bytes += len(entry)
            self._policy.on_put(key)
            return True

    def remove(self, key: CacheEngineKey) -> bool:
        with self._lock:
            if key not in self._entries or not self.is_evictable(key):
                return False
            self._drop(key)
            return True

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._ref_counts.clear()
            self._pin_counts.clear()
            self._used_bytes = 0

    def _make_room(self, num_bytes: int) -> bool:
        """Evict until `num_bytes` more fit; evict nothing when that is impossible."""
        needed = self._used_bytes + num_bytes - self.capacity_bytes
        if needed <= 0:
            return True
        if num_bytes > self.capacity_bytes:
            return False
        victims = self._policy.choose_victims(needed, lambda key: len(self._entries[key]), self.is_evictable)
        if sum(len(self._entries[key]) for key in victims) < needed:
            return False
        for key in victims:
            self._drop(key)
            self.metrics.evictions += 1
        return True

    def _drop(self, key: CacheEngineKey) -> None:
        self._used_bytes -= len(self._entries.pop(key))
        self._policy.on_remove(key)

    @staticmethod
    def _decrement(counts: dict[CacheEngineKey, int], key: CacheEngineKey) -> None:
        remaining = counts.get(key, 0) - 1
        if remaining > 0:
            counts[key] = remaining
        else:
            counts.pop(key, None)
