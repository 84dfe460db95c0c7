"""CPU tier: a hard byte budget, policy eviction, and ref/pin counts that block eviction and removal."""

from __future__ import annotations

import pytest
from kvstore_helpers import make_entry, make_key

from pagoda.kvstore.tiers.cpu import CPUTier

ENTRY_SIZE = len(make_entry(make_key(0)))


def filled_tier(num_entries: int, capacity_entries: int, policy: str = "lru") -> CPUTier:
    tier = CPUTier(capacity_entries * ENTRY_SIZE, policy)
    for i in range(num_entries):
        assert tier.put(make_key(i), make_entry(make_key(i)))
    return tier


def test_get_returns_what_was_put() -> None:
    tier = filled_tier(2, 4)
    assert tier.get(make_key(1)) == make_entry(make_key(1))
    assert tier.get(make_key(9)) is None
    assert tier.contains(make_key(0)) and not tier.contains(make_key(9))


def test_budget_is_a_hard_limit() -> None:
    tier = filled_tier(10, 3)
    assert tier.used_bytes <= tier.capacity_bytes
    assert len(tier) == 3
    assert tier.metrics.evictions == 7
    assert not tier.put(make_key("huge"), make_entry(make_key("huge"), num_values=4096))
    assert tier.used_bytes <= tier.capacity_bytes


def test_lru_evicts_the_least_recently_read() -> None:
    tier = filled_tier(3, 3)
    tier.get(make_key(0))
    tier.put(make_key(3), make_entry(make_key(3)))
    assert not tier.contains(make_key(1))
    assert tier.contains(make_key(0))


def test_policy_is_selectable() -> None:
    tier = filled_tier(3, 3, policy="mru")
    tier.get(make_key(0))
    tier.put(make_key(3), make_entry(make_key(3)))
    assert not tier.contains(make_key(0))


def test_pinned_entries_are_never_evicted_or_removed() -> None:
    tier = filled_tier(2, 2)
    assert tier.pin(make_key(0)) and tier.pin(make_key(1))
    assert not tier.put(make_key(2), make_entry(make_key(2)))
    assert tier.metrics.failed_puts == 1
    assert not tier.remove(make_key(0))
    tier.unpin(make_key(0))
    assert tier.put(make_key(2), make_entry(make_key(2)))
    assert not tier.contains(make_key(0)) and tier.contains(make_key(1))
    assert not tier.pin(make_key("absent"))


def test_pins_count() -> None:
    tier = filled_tier(1, 1)
    tier.pin(make_key(0))
    tier.pin(make_key(0))
    tier.unpin(make_key(0))
    assert not tier.is_evictable(make_key(0))
    tier.unpin(make_key(0))
    assert tier.is_evictable(make_key(0))


def test_an_entry_being_read_is_not_evicted() -> None:
    tier = filled_tier(2, 2)
    with tier.read(make_key(0)) as view:
        assert view is not None and bytes(view) == make_entry(make_key(0))
        tier.put(make_key(2), make_entry(make_key(2)))  # evicts 1, the only evictable entry
        assert tier.contains(make_key(0)) and not tier.contains(make_key(1))
        assert not tier.remove(make_key(0))
    assert tier.remove(make_key(0))
    with tier.read(make_key("absent")) as view:
        assert view is None


def test_put_refused_when_not_enough_is_evictable_evicts_nothing() -> None:
    tier = filled_tier(2, 2)
    tier.pin(make_key(0))
    assert not tier.put(make_key("big"), make_entry(make_key("big"), num_values=20))
    assert tier.contains(make_key(1))
    assert tier.metrics.evictions == 0


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity_bytes"):
        CPUTier(0)
