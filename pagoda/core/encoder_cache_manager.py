"""Core layer: the scheduler's book of the worker's encoder cache — which items' encoder outputs it holds.

Capacity is counted in encoder output rows (embeddings: 256 per Gemma 3
crop), not in prompt tokens. An entry is keyed by the item's `mm_hash`, so
requests showing the same image share it. An entry some request still needs
(running, or waiting with the item not yet computed) is referenced and never
evicted; an unreferenced entry stays cached for later requests and is evicted
least recently used first, and only when space for a new entry is needed.
(vLLM's manager evicts in the order entries became unreferenced and never
refreshes them on a hit; here a hit on an unreferenced entry moves it to the
most-recent end.)

The worker's storage follows this book: every eviction is reported once in
the next `SchedulerOutput` (`free_encoder_mm_hashes`), and the worker drops
those tensors. An item evicted and allocated again within one scheduling
pass is not reported, so the worker keeps what it has.
"""

from __future__ import annotations

from collections import OrderedDict


class EncoderCacheManager:
    def __init__(self, cache_size: int) -> None:
        if cache_size <= 0:
            raise ValueError(f"encoder cache size must be positive, got {cache_size}")
        self.cache_size = cache_size
        self.num_free_slots = cache_size
        # identifier -> request ids referencing it.
        self._referenced_by: dict[str, set[str]] = {}
        # identifier -> embeddings, for every entry the worker holds or will hold after this step.
        self._num_embeds: dict[str, int] = {}
        # Unreferenced entries, least recently used first.
        self._unreferenced: OrderedDict[str, None] = OrderedDict()
        self._evicted: list[str] = []
        self.num_hits = 0
        self.num_evictions = 0

    def __contains__(self, identifier: str) -> bool:
        return identifier in self._num_embeds

    @property
    def num_cached(self) -> int:
        return len(self._num_embeds)

    def check_and_update_cache(self, request_id: str, identifier: str) -> bool:
        """Whether the item's output is cached; if so the request now references it (a hit)."""
        if identifier not in self._num_embeds:
            return False
        referencing = self._referenced_by.setdefault(identifier, set())
        if request_id not in referencing:
            referencing.add(request_id)
            self._unreferenced.pop(identifier, None)
            self.num_hits += 1
        return True

    def can_allocate(self, num_embeds: int) -> bool:
        """Whether an entry of `num_embeds` fits, evicting unreferenced entries (least recent first) if needed."""
        if num_embeds > self.num_free_slots + self._num_unreferenced_slots():
            return False
        while num_embeds > self.num_free_slots:
            identifier, _ = self._unreferenced.popitem(last=False)
            self.num_free_slots += self._num_embeds.pop(identifier)
            self._referenced_by.pop(identifier, None)
            self._evicted.append(identifier)
            self.num_evictions += 1
        return True

    def allocate(self, request_id: str, identifier: str, num_embeds: int) -> None:
        """Take space for a new entry (call `can_allocate` first); the request references it."""
        if identifier in self._num_embeds:
            raise ValueError(f"encoder cache entry {identifier} is already allocated")
        if num_embeds > self.num_free_slots:
            raise ValueError(f"encoder cache has {self.num_free_slots} free slots, {num_embeds} asked")
        self.num_free_slots -= num_embeds
        self._num_embeds[identifier] = num_embeds
        self._referenced_by[identifier] = {request_id}

    def free_encoder_input(self, request_id: str, identifier: str) -> None:
        """The request no longer needs this item; unreferenced, the entry becomes the most recently used."""
        referencing = self._referenced_by.get(identifier)
        if referencing is None or request_id not in referencing:
            return
        referencing.discard(request_id)
        if not referencing:
            self._unreferenced[identifier] = None
            self._unreferenced.move_to_end(identifier)

    def free(self, request_id: str, identifiers: list[str]) -> None:
        """Drop every reference of a finished or preempted request."""
        for identifier in identifiers:
            self.free_encoder_input(request_id, identifier)

    def is_referenced(self, identifier: str) -> bool:
        return bool(self._referenced_by.get(identifier))

    def get_freed_mm_hashes(self) -> list[str]:
        """Entries evicted since the last call and not allocated again since: the worker drops them."""
        freed = [identifier for identifier in dict.fromkeys(self._evicted) if identifier not in self._num_embeds]
        self._evicted = []
        return freed

    def reset(self) -> None:
        """Forget every unreferenced entry (with the prefix cache); the next output tells the worker."""
        for identifier in list(self._unreferenced):
            del self._unreferenced[identifier]
            self.num_free_slots += self._num_embeds.pop(identifier)
            self._referenced_by.pop(identifier, None)
            self._evicted.append(identifier)

    @property
    def num_referenced(self) -> int:
        """Entries some request still needs: zero once the engine is idle, or a reference leaked."""
        return len(self._num_embeds) - len(self._unreferenced)

    def metrics(self) -> dict[str, float]:
        return {"hits": float(self.num_hits), "evictions": float(self.num_evictions),
                "entries": float(self.num_cached), "referenced": float(self.num_referenced),
                "free_rows": float(self.num_free_slots)}

    def _num_unreferenced_slots(self) -> int:
        return sum(self._num_embeds[identifier] for identifier in self._unreferenced)
