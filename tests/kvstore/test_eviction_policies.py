"""Eviction policies: each order, the evictable filter, byte targets and the factory."""

from __future__ import annotations

import pytest

from pagoda.kvstore.policies import EvictionPolicy, make_policy


def one(_: object) -> int:
    return 1


def always(_: object) -> bool:
    return True


def filled(name: str) -> EvictionPolicy:
    """Puts a, b, c, d in that order, then reads c, a, c."""
    policy = make_policy(name)
    for key in "abcd":
        policy.on_put(key)
    for key in "cac":
        policy.on_access(key)
    return policy


@pytest.mark.parametrize(
    "name, order",
    [("lru", "bdac"), ("fifo", "abcd"), ("mru", "cadb"), ("lfu", "bdac")],
)
def test_eviction_order(name: str, order: str) -> None:
    assert "".join(filled(name).choose_victims(4, one, always)) == order


def test_lfu_prefers_fewer_uses_over_recency() -> None:
    policy = make_policy("lfu")
    for key in "ab":
        policy.on_put(key)
    policy.on_access("a")
    policy.on_access("a")
    policy.on_put("c")
    policy.on_access("c")
    # Uses: a 3, c 2, b 1.
    assert policy.choose_victims(3, one, always) == ["b", "c", "a"]


def test_fifo_overwrite_keeps_position_lru_overwrite_refreshes() -> None:
    fifo, lru = make_policy("fifo"), make_policy("lru")
    for policy in (fifo, lru):
        for key in "abc":
            policy.on_put(key)
        policy.on_put("a")
    assert fifo.choose_victims(1, one, always) == ["a"]
    assert lru.choose_victims(1, one, always) == ["b"]


@pytest.mark.parametrize("name", ["lru", "fifo", "lfu", "mru"])
def test_never_chooses_unevictable_keys(name: str) -> None:
    policy = filled(name)
    victims = policy.choose_victims(10, one, lambda key: key not in {"a", "c"})
    assert sorted(victims) == ["b", "d"]


@pytest.mark.parametrize("name", ["lru", "fifo", "lfu", "mru"])
def test_removed_keys_are_forgotten(name: str) -> None:
    policy = filled(name)
    policy.on_remove("b")
    policy.on_remove("missing")
    assert sorted(policy.choose_victims(10, one, always)) == ["a", "c", "d"]


def test_stops_once_enough_bytes_are_freed() -> None:
    policy = make_policy("fifo")
    sizes = {"a": 10, "b": 30, "c": 5}
    for key in sizes:
        policy.on_put(key)
    assert policy.choose_victims(35, sizes.__getitem__, always) == ["a", "b"]
    assert policy.choose_victims(0, sizes.__getitem__, always) == []


def test_factory_names_the_valid_choices() -> None:
    assert make_policy().name == "lru"
    assert make_policy("LFU").name == "lfu"
    with pytest.raises(ValueError, match=r"\['fifo', 'lfu', 'lru', 'mru'\].*'arc'"):
        make_policy("arc")
