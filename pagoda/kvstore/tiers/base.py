"""KV store layer: the interface every storage tier implements, and its metrics.

A tier stores encoded entries (`pagoda.kvstore.entry`) by `CacheEngineKey`.
Adding a kind of storage means adding one module with one `StorageTier`
subclass; the storage manager never looks at which class a tier is, only at
its capability attributes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields

from pagoda.kvstore.keys import CacheEngineKey


@dataclass(slots=True)
class TierMetrics:
    """Counters of one tier since it was created; the tier, the storage manager and the connector add to them."""

    lookups: int = 0  # keys this tier was asked about (get, contains, prefix lookup)
    hits: int = 0  # of those, the keys it had
    hit_tokens: int = 0  # tokens whose KV the connector loaded from this tier
    bytes_in: int = 0  # entry bytes stored into the tier
    bytes_out: int = 0  # entry bytes served from the tier
    loads: int = 0  # entries served by get, checked
    load_seconds: float = 0.0  # time spent reading and checking those entries
    saves: int = 0  # entries the tier accepted
    save_seconds: float = 0.0  # time spent in accepted puts (queueing only, for tiers with async puts)
    evictions: int = 0
    corrupt_dropped: int = 0  # entries that failed their checks and were dropped
    failed_puts: int = 0  # puts refused (full, down) or failed
    errors: int = 0  # unexpected exceptions the tier raised, each treated as a miss

    def as_dict(self) -> dict[str, float]:
        """Every counter as a plain number, for /metrics and `LLM.get_metrics()`."""
        return {field.name: float(getattr(self, field.name)) for field in fields(self)}


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

    def contains_many(self, keys: Sequence[CacheEngineKey]) -> list[bool]:
        """`contains` for each key; remote tiers override it to ask in one round trip."""
        return [self.contains(key) for key in keys]

    @abstractmethod
    def get(self, key: CacheEngineKey) -> bytes | None:
        """The stored entry bytes, unchecked (the storage manager checks them), or None when absent or unreadable."""

    @abstractmethod
    def put(self, key: CacheEngineKey, entry: bytes) -> bool:
        """Store an encoded entry; False when it was refused."""

    @abstractmethod
    def remove(self, key: CacheEngineKey) -> bool:
        """Forget an entry; False when it was absent or cannot be removed now (pinned or referenced)."""

    def flush(self) -> None:
        """Wait until every accepted put is stored; tiers that write synchronously have nothing to wait for."""

    @abstractmethod
    def close(self) -> None:
        """Finish queued work and release resources."""
