"""KV store layer: the ordered tiers of the store, with write-through, promotion, prefetch and prefix lookup.

Tier 0 is the fastest. A put encodes the entry once and writes it through to
every writable tier; a get takes the first readable tier that has the key,
checks the bytes (here, once per read: tiers hand back raw bytes) and
promotes a lower-tier hit to tier 0 so the next read is fast. `prefetch`
does the same promotion on a background thread, ahead of need.

Per tier, `readonly` freezes it (read, never written or removed: e.g. a
shared Redis warmed by someone else) and `writeonly` bypasses it for reads
(only written: e.g. warming a shared Redis for other engines). Tier 0 is the
promotion target only when it is neither.

A tier that raises anything is skipped for that call and counted: the caller
sees a miss and recomputes, it never sees an exception or bad bytes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

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

__all__ = ["StorageManager", "StoreHit", "TierMetrics"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StoreHit:
    """A checked entry and the name of the tier that supplied it."""

    entry: DecodedEntry
    tier: str


class StorageManager:
    def __init__(
        self,
        tiers: Sequence[StorageTier],
        *,
        readonly: Collection[str] = (),
        writeonly: Collection[str] = (),
    ) -> None:
        """`tiers` fastest first; `readonly` and `writeonly` name tiers by `StorageTier.name`."""
        if not tiers:
            raise ValueError("tiers must name at least one storage tier")
        names = [tier.name for tier in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique (metrics and hits are reported by name), got {names}")
        for flag, flagged in (("readonly", readonly), ("writeonly", writeonly)):
            unknown = sorted(set(flagged) - set(names))
            if unknown:
                raise ValueError(f"{flag} names tiers that do not exist: {unknown} (tiers: {names})")
        both = sorted(set(readonly) & set(writeonly))
        if both:
            raise ValueError(f"tiers cannot be both readonly and writeonly: {both}")
        self.tiers = list(tiers)
        self.readonly = frozenset(readonly)
        self.writeonly = frozenset(writeonly)
        self._readable = [tier for tier in self.tiers if tier.name not in self.writeonly]
        self._writable = [tier for tier in self.tiers if tier.name not in self.readonly]
        first = self.tiers[0]
        self._promotion_target = first if first in self._readable and first in self._writable else None
        # Counters are bumped from load, save, lookup and prefetch threads; `+=` on an attribute is not atomic.
        self._metrics_lock = threading.Lock()
        self._failed_tiers: set[str] = set()  # tiers that raised: their first failure was logged
        self._corrupt_tiers: set[str] = set()  # tiers that served a corrupt entry: the first one was logged
        self._prefetch_lock = threading.Lock()
        self._prefetching: set[CacheEngineKey] = set()
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="pagoda-kv-prefetch")
        self._closed = False

    @property
    def writes_anything(self) -> bool:
        """Whether some tier accepts puts (a rank that only reads shared tiers may have none)."""
        return bool(self._writable)

    def metrics(self) -> dict[str, TierMetrics]:
        """Each tier's counters by tier name (live objects, not copies)."""
        return {tier.name: tier.metrics for tier in self.tiers}

    def metrics_snapshot(self) -> dict[str, dict[str, float]]:
        """A copy of every tier's counters as plain numbers: tier name -> counter -> value."""
        with self._metrics_lock:
            return {tier.name: tier.metrics.as_dict() for tier in self.tiers}

    def put(
        self,
        key: CacheEngineKey,
        data: np.ndarray | bytes | bytearray | memoryview,
        shape: tuple[int, ...],
        dtype: str,
    ) -> int:
        """Store one chunk's KV in every writable tier; returns how many tiers accepted it."""
        entry = encode_entry(key, data, shape, dtype)
        return sum(self._put_into(tier, key, entry) for tier in self._writable)

    def get(self, key: CacheEngineKey) -> StoreHit | None:
        """The checked entry from the first readable tier holding it, promoted to tier 0; None on a miss."""
        return self._load(key, self._readable)

    def contains(self, key: CacheEngineKey) -> bool:
        return self.lookup_prefix([key]) == 1

    def lookup_prefix(self, keys: Sequence[CacheEngineKey]) -> int:
        """Number of leading keys present in some readable tier.

        Each tier is asked once, with `contains_many`, about every key no
        faster tier has (one round trip for a remote tier, where asking key
        by key up to the first gap would cost one round trip per key). Tiers
        below are not asked once all keys are found.
        """
        keys = list(keys)
        unresolved = list(range(len(keys)))
        for tier in self._readable:
            if not unresolved:
                break
            found = self._tier_contains_many(tier, [keys[i] for i in unresolved])
            with self._metrics_lock:
                tier.metrics.lookups += len(unresolved)
                tier.metrics.hits += sum(found)
            unresolved = [i for i, present in zip(unresolved, found) if not present]
        return unresolved[0] if unresolved else len(keys)

    def prefetch(self, keys: Iterable[CacheEngineKey]) -> None:
        """Promote to tier 0, in the background, the keys that only lower tiers hold; returns at once.

        A key already queued or already in tier 0 is skipped, so asking
        again while a request waits costs nothing.
        """
        target = self._promotion_target
        if target is None or self._closed:
            return
        with self._prefetch_lock:
            queued = [key for key in keys if key not in self._prefetching and not self._tier_contains(target, key)]
            self._prefetching.update(queued)
        if queued:
            self._prefetcher.submit(self._prefetch, target, queued)

    def remove(self, key: CacheEngineKey) -> int:
        """Remove a key from every writable tier; returns how many tiers dropped it."""
        return sum(self._remove_from(tier, key) for tier in self._writable)

    def flush(self) -> None:
        """Wait for queued prefetches, then for every tier's queued writes."""
        if not self._closed:
            self._prefetcher.submit(lambda: None).result()
        for tier in self.tiers:
            self._guarded(tier, None, tier.flush)

    def close(self) -> None:
        self._closed = True
        self._prefetcher.shutdown(wait=True, cancel_futures=True)
        for tier in self.tiers:
            self._guarded(tier, None, tier.close)

    def _load(self, key: CacheEngineKey, tiers: Sequence[StorageTier]) -> StoreHit | None:
        for tier in tiers:
            started = time.perf_counter()
            entry = self._guarded(tier, None, tier.get, key)
            decoded = None if entry is None else self._check(tier, key, entry)
            elapsed = time.perf_counter() - started
            with self._metrics_lock:
                tier.metrics.lookups += 1
            if entry is None or decoded is None:
                continue
            with self._metrics_lock:
                tier.metrics.hits += 1
                tier.metrics.loads += 1
                tier.metrics.load_seconds += elapsed
                tier.metrics.bytes_out += len(entry)
            target = self._promotion_target
            if target is not None and tier is not target:
                self._put_into(target, key, entry)
            return StoreHit(entry=decoded, tier=tier.name)
        return None

    def _check(self, tier: StorageTier, key: CacheEngineKey, entry: bytes) -> DecodedEntry | None:
        """The decoded entry, or None after dropping and counting an entry that fails its checks."""
        try:
            return decode_entry(entry, key)
        except CorruptEntryError as exc:
            error = exc
        with self._metrics_lock:
            tier.metrics.corrupt_dropped += 1
            first = tier.name not in self._corrupt_tiers
            self._corrupt_tiers.add(tier.name)
        # A frozen tier serves the same bad entry on every read: one warning per tier, the rest are counted.
        logger.log(
            logging.WARNING if first else logging.DEBUG,
            "KV store: tier %s returned a corrupt entry for %s (%s); dropping it (further ones are only counted, "
            "in corrupt_dropped)", tier.name, key.to_string(), error,
        )  # fmt: skip
        if tier.name not in self.readonly:  # a frozen tier keeps it: each read drops it again
            self._remove_from(tier, key)
        return None

    def _prefetch(self, target: StorageTier, keys: list[CacheEngineKey]) -> None:
        lower = [tier for tier in self._readable if tier is not target]
        for key in keys:
            try:
                if not self._closed and not self._tier_contains(target, key):
                    self._load(key, lower)
            finally:
                with self._prefetch_lock:
                    self._prefetching.discard(key)

    def _put_into(self, tier: StorageTier, key: CacheEngineKey, entry: bytes) -> bool:
        started = time.perf_counter()
        try:
            accepted = tier.put(key, entry)
        except Exception as exc:  # tiers count their own refusals; a put that raised is counted here
            self._tier_failed(tier, exc)
            with self._metrics_lock:
                tier.metrics.failed_puts += 1
            return False
        elapsed = time.perf_counter() - started
        if accepted:
            with self._metrics_lock:
                tier.metrics.saves += 1
                tier.metrics.save_seconds += elapsed
                tier.metrics.bytes_in += len(entry)
        return accepted

    def _tier_contains(self, tier: StorageTier, key: CacheEngineKey) -> bool:
        return self._guarded(tier, False, tier.contains, key)

    def _tier_contains_many(self, tier: StorageTier, keys: list[CacheEngineKey]) -> list[bool]:
        found = self._guarded(tier, None, tier.contains_many, keys)
        if found is None or len(found) != len(keys):
            return [False] * len(keys)
        return found

    def _remove_from(self, tier: StorageTier, key: CacheEngineKey) -> bool:
        return self._guarded(tier, False, tier.remove, key)

    def _guarded(self, tier: StorageTier, fallback: T, call: Callable[..., T], *args: object) -> T:
        """`call(*args)`, or `fallback` when the tier raises anything: a failing tier is a miss, never an error."""
        try:
            return call(*args)
        except Exception as exc:
            self._tier_failed(tier, exc)
            return fallback

    def _tier_failed(self, tier: StorageTier, exc: Exception) -> None:
        with self._metrics_lock:
            tier.metrics.errors += 1
            first = tier.name not in self._failed_tiers
            self._failed_tiers.add(tier.name)
        if first:  # one traceback per tier; later failures are only counted, or logs would flood
            logger.warning(
                "KV store: tier %s failed (%r); each failure is a miss, counted in its errors and not logged again",
                tier.name,
                exc,
                exc_info=exc,
            )
