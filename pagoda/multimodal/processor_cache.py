"""Multimodal (front end and engine side): the processor caches, LRU bounded by bytes and keyed by `mm_hash`.

`ProcessorCache` keeps an image's processed pixels in the front end, so an
image seen before skips decoding and resizing (it is still hashed: the key is
its content).

When the engine runs in its own process, a known image's pixels should not
cross the socket again. The two sides keep mirrored caches of the same byte
capacity: the front end's `SenderCache` records sizes only and decides, item
by item, whether the pixels must travel; the engine's `ReceiverCache` stores
the pixels. Both apply the same operation for each item in the same order
(a hit touches the entry, a miss inserts it with the same byte size), so
both evict the same entries. Should they drift anyway (a request lost
between them), the receiver reports the identifiers it lacks; the front end
forgets them and resends their pixels. A miss is never an error for the user.

Capacity 0 disables a cache: nothing is stored, every lookup misses.
Pure Python (no torch, no numpy), so `pagoda/core`-side code could use them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from pagoda.core.multimodal import MultiModalFeature, PixelData

V = TypeVar("V")


@dataclass(slots=True)
class CacheStats:
    """Counters a test or the metrics read: lookups that hit or missed, entries evicted, bytes held now."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    num_bytes: int = 0
    num_entries: int = 0


class LRUByteCache(Generic[V]):
    """Values by key, least recently used evicted first once their bytes would pass the capacity."""

    def __init__(self, capacity_bytes: int) -> None:
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes < 0:
            raise ValueError(f"cache capacity must be a byte count >= 0, got {capacity_bytes!r}")
        self.capacity_bytes = capacity_bytes
        self.stats = CacheStats()
        self._entries: OrderedDict[str, tuple[V, int]] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        """Presence without touching the entry or counting a lookup."""
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        """Keys from least to most recently used."""
        return list(self._entries)

    def get(self, key: str) -> V | None:
        """The value (now most recently used), or None; counts a hit or a miss."""
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry[0]

    def put(self, key: str, value: V, num_bytes: int) -> bool:
        """Store `value` as most recently used, evicting as needed; False if it exceeds the whole capacity."""
        old = self._entries.pop(key, None)
        if old is not None:
            self._account(-old[1], -1)
        if num_bytes > self.capacity_bytes:
            return False
        while self.stats.num_bytes + num_bytes > self.capacity_bytes:
            _, (_, evicted_bytes) = self._entries.popitem(last=False)
            self._account(-evicted_bytes, -1)
            self.stats.evictions += 1
        self._entries[key] = (value, num_bytes)
        self._account(num_bytes, 1)
        return True

    def pop(self, key: str) -> V | None:
        """Remove `key` (not counted as an eviction)."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self._account(-entry[1], -1)
        return entry[0]

    def clear(self) -> None:
        """Forget every entry (not counted as evictions)."""
        self._entries.clear()
        self.stats.num_bytes = self.stats.num_entries = 0

    def _account(self, num_bytes: int, num_entries: int) -> None:
        self.stats.num_bytes += num_bytes
        self.stats.num_entries += num_entries


@dataclass(frozen=True, slots=True)
class ProcessedImage:
    """What the processor cache keeps for an item: its pixels and how many Pan-and-Scan crops they hold."""

    pixel_values: PixelData
    num_crops: int


class ProcessorCache:
    """The front end's cache of processed pixels."""

    def __init__(self, capacity_bytes: int) -> None:
        self._cache: LRUByteCache[ProcessedImage] = LRUByteCache(capacity_bytes)

    @property
    def stats(self) -> CacheStats:
        return self._cache.stats

    def get(self, mm_hash: str) -> ProcessedImage | None:
        return self._cache.get(mm_hash)

    def put(self, mm_hash: str, processed: ProcessedImage) -> None:
        self._cache.put(mm_hash, processed, processed.pixel_values.nbytes)

    def clear(self) -> None:
        self._cache.clear()


class SenderCache:
    """The front end's mirror of the engine's `ReceiverCache`: sizes only."""

    def __init__(self, capacity_bytes: int) -> None:
        self._sizes: LRUByteCache[int] = LRUByteCache(capacity_bytes)

    @property
    def stats(self) -> CacheStats:
        return self._sizes.stats

    def keys(self) -> list[str]:
        """The identifiers believed held by the engine, least recently used first."""
        return self._sizes.keys()

    def must_send(self, mm_hash: str, num_bytes: int) -> bool:
        """True if the engine lacks these pixels, so they must travel; records that they will then be held."""
        if self._sizes.get(mm_hash) is not None:
            return False
        self._sizes.put(mm_hash, num_bytes, num_bytes)
        return True

    def strip(self, features: Iterable[MultiModalFeature]) -> list[MultiModalFeature]:
        """The features to send, in order: without pixels where the engine's cache holds them."""
        return [feature if feature.pixel_values is None or self.must_send(feature.identifier,
                                                                          feature.pixel_values.nbytes)
                else feature.without_pixels() for feature in features]

    def forget(self, mm_hashes: Iterable[str]) -> None:
        """Drop entries the engine reported missing, so their pixels are sent again."""
        for mm_hash in mm_hashes:
            self._sizes.pop(mm_hash)

    def clear(self) -> None:
        self._sizes.clear()


class ReceiverCache:
    """The engine side's cache of pixels, mirroring the front end's `SenderCache`.

    Its `misses` count only items that arrived without pixels and were not here: drift the front end repairs.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self._pixels: LRUByteCache[PixelData] = LRUByteCache(capacity_bytes)

    @property
    def stats(self) -> CacheStats:
        return self._pixels.stats

    def keys(self) -> list[str]:
        """The identifiers held, least recently used first (equal to the sender's while they agree)."""
        return self._pixels.keys()

    def fill(self, features: Iterable[MultiModalFeature]) -> tuple[list[MultiModalFeature], list[str]]:
        """Features with their pixels filled in, and the identifiers this cache lacked (to be resent).

        Features that came with pixels are stored; those without are looked up. When any identifier is
        missing, the request cannot run until the front end resends it.
        """
        filled: list[MultiModalFeature] = []
        missing: list[str] = []
        for feature in features:
            if feature.pixel_values is not None:
                self._pixels.put(feature.identifier, feature.pixel_values, feature.pixel_values.nbytes)
                filled.append(feature)
                continue
            pixels = self._pixels.get(feature.identifier)
            if pixels is None:
                missing.append(feature.identifier)
                filled.append(feature)
            else:
                filled.append(feature.with_pixels(pixels))
        return filled, missing

    def clear(self) -> None:
        self._pixels.clear()
