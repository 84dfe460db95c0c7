"""KV store layer: the interface every storage tier implements, and its metrics.

A tier stores encoded entries (`pagoda.kvstore.entry`) by `CacheEngineKey`.
Adding a kind of storage means adding one module with one `StorageTier`
subclass; the storage manager never looks at which class a tier is, only at
its capability attributes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from pagoda.kvstore.keys import CacheEngineKey


@dataclass(slots=True)
class TierMetrics:
    """Counters of one tier since it was created; the tier and the storage manager both add to them."""

    lookups: int = 0
    hits: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    evictions: int = 0
    corrupt_dropped: int = 0
    failed_puts: int = 0


class StorageTier(ABC):
    """One level of the store.

    Contract: `get` returns exactly the bytes given to `put` for that key, or
    None; `put` never raises for storage faults (the entry is dropped, the
    tokens get recomputed) and returns whether the entry was accepted; a tier
    that cannot fit an entry refuses it rather than exceed its budget.
    """

    name: str
    # Local tiers live in this process or on this machine; remote ones are shared by many engines.
    is_local: bool
    # True when `put` only queues the write: `contains` may then see the entry before it is durable.
    supports_async_put: bool

    def __init__(self) -> None:
        self.metrics = TierMetrics()

    @abstractmethod
    def contains(self, key: CacheEngineKey) -> bool:
        """Whether `get(key)` would currently find an entry."""

    @abstractmethod
    def get(self, key: CacheEngineKey) -> bytes | None:
        """The stored entry bytes, or None when absent or unreadable."""

    @abstractmethod
    def put(self, key: CacheEngineKey, entry: bytes) -> bool:
        """Store an encoded entry; False when it was refused."""

    @abstractmethod
    def remove(self, key: CacheEngineKey) -> bool:
        """Forget an entry; False when it was absent or cannot be removed now (pinned or referenced)."""

    @abstractmethod
    def close(self) -> None:
        """Finish queued work and release resources."""
