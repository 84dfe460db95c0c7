"""KV store layer: eviction policies deciding which stored entries a full tier gives up.

A policy only orders keys; the tier owns sizes and knows which entries are
pinned or referenced, and passes that in as `evictable`, so no policy can
choose an entry that is being read or written.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from itertools import count

Key = Hashable


class EvictionPolicy(ABC):
    """Tracks the keys of one tier and names victims in the policy's order."""

    name: str

    @abstractmethod
    def on_put(self, key: Key) -> None:
        """A new entry was stored (or an existing one overwritten)."""

    @abstractmethod
    def on_access(self, key: Key) -> None:
        """An entry was read."""

    @abstractmethod
    def on_remove(self, key: Key) -> None:
        """An entry left the tier (evicted, deleted or found corrupt)."""

    @abstractmethod
    def eviction_order(self) -> Iterable[Key]:
        """Every tracked key, first victim first."""

    def choose_victims(
        self, num_bytes: int, size_of: Callable[[Key], int], evictable: Callable[[Key], bool]
    ) -> list[Key]:
        """Victims in policy order whose sizes add up to at least `num_bytes`.

        Returns fewer bytes than asked when too few entries are evictable; the
        caller then refuses the put instead of breaking its budget. Pass
        `size_of=lambda key: 1` to ask for a number of entries.
        """
        victims: list[Key] = []
        freed = 0
        for key in self.eviction_order():
            if freed >= num_bytes:
                break
            if evictable(key):
                victims.append(key)
                freed += size_of(key)
        return victims


class LRUPolicy(EvictionPolicy):
    """Least recently used first: a read moves the key to the back of the queue."""

    name = "lru"

    def __init__(self) -> None:
        self._keys: OrderedDict[Key, None] = OrderedDict()

    def on_put(self, key: Key) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key)

    def on_access(self, key: Key) -> None:
        if key in self._keys:
            self._keys.move_to_end(key)

    def on_remove(self, key: Key) -> None:
        self._keys.pop(key, None)

    def eviction_order(self) -> Iterable[Key]:
        return list(self._keys)


class MRUPolicy(LRUPolicy):
    """Most recently used first: suits one-pass scans where the newest entry is the least likely to return."""

    name = "mru"

    def eviction_order(self) -> Iterable[Key]:
        return list(reversed(self._keys))


class FIFOPolicy(LRUPolicy):
    """Oldest insertion first; reads do not change the order."""

    name = "fifo"

    def on_put(self, key: Key) -> None:
        # An overwrite keeps the original insertion position.
        self._keys.setdefault(key, None)

    def on_access(self, key: Key) -> None:
        pass


class LFUPolicy(EvictionPolicy):
    """Least frequently used first; ties go to the least recently used."""

    name = "lfu"

    def __init__(self) -> None:
        self._stats: dict[Key, tuple[int, int]] = {}  # key -> (number of uses, tick of last use)
        self._ticks = count()

    def on_put(self, key: Key) -> None:
        uses = self._stats[key][0] if key in self._stats else 0
        self._stats[key] = (uses + 1, next(self._ticks))

    def on_access(self, key: Key) -> None:
        if key in self._stats:
            self._stats[key] = (self._stats[key][0] + 1, next(self._ticks))

    def on_remove(self, key: Key) -> None:
        self._stats.pop(key, None)

    def eviction_order(self) -> Iterable[Key]:
        # Sorting at eviction time keeps puts and reads O(1); evictions are rare next to reads.
        return sorted(self._stats, key=self._stats.__getitem__)


_POLICIES: dict[str, type[EvictionPolicy]] = {
    policy.name: policy for policy in (LRUPolicy, FIFOPolicy, LFUPolicy, MRUPolicy)
}


def make_policy(name: str = "lru") -> EvictionPolicy:
    """A fresh policy by name (case-insensitive)."""
    try:
        return _POLICIES[name.lower()]()
    except KeyError:
        raise ValueError(f"eviction policy must be one of {sorted(_POLICIES)}, got {name!r}") from None
