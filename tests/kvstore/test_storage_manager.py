"""Storage manager: write-through, promotion, prefetch, prefix lookup, readonly/writeonly tiers, failing tiers, metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from kvstore_helpers import make_entry, make_key

from pagoda.kvstore.entry import entry_to_numpy
from pagoda.kvstore.keys import CacheEngineKey
from pagoda.kvstore.storage_manager import StorageManager, StoreHit
from pagoda.kvstore.tiers.base import StorageTier
from pagoda.kvstore.tiers.cpu import CPUTier
from pagoda.kvstore.tiers.disk import DiskTier

ENTRY_SIZE = len(make_entry(make_key(0)))
VALUES = np.arange(16, dtype=np.float32)


class BrokenTier(StorageTier):
    """A tier with a bug: every call raises something that is not an OSError."""

    name = "broken"
    is_local = False
    supports_async_put = False

    def contains(self, key: CacheEngineKey) -> bool:
        raise RuntimeError("bug in contains")

    def get(self, key: CacheEngineKey) -> bytes | None:
        raise KeyError("bug in get")

    def put(self, key: CacheEngineKey, entry: bytes) -> bool:
        raise TypeError("bug in put")

    def remove(self, key: CacheEngineKey) -> bool:
        raise ValueError("bug in remove")

    def close(self) -> None:
        pass


class BatchingTier(CPUTier):
    """A CPU tier that records how it is asked: a remote tier would pay one round trip per call."""

    name = "batching"

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self.calls: list[str] = []

    def contains(self, key: CacheEngineKey) -> bool:
        self.calls.append("contains")
        return super().contains(key)

    def contains_many(self, keys: Sequence[CacheEngineKey]) -> list[bool]:
        self.calls.append(f"contains_many({len(keys)})")
        return [CPUTier.contains(self, key) for key in keys]


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[StorageManager]:
    store = StorageManager([CPUTier(2 * ENTRY_SIZE), DiskTier(tmp_path, 10 * ENTRY_SIZE)])
    yield store
    store.close()


def put(manager: StorageManager, name: object) -> None:
    manager.put(make_key(name), VALUES, VALUES.shape, "float32")
    manager.flush()


def values_of(hit: StoreHit | None) -> np.ndarray:
    assert hit is not None
    return entry_to_numpy(hit.entry)


def test_put_writes_through_every_tier(manager: StorageManager) -> None:
    put(manager, 0)
    assert all(tier.contains(make_key(0)) for tier in manager.tiers)
    snapshot = manager.metrics_snapshot()
    assert snapshot["cpu"]["bytes_in"] == snapshot["disk"]["bytes_in"] == ENTRY_SIZE
    assert snapshot["cpu"]["saves"] == snapshot["disk"]["saves"] == 1


def test_get_from_tier_0_is_bit_identical(manager: StorageManager) -> None:
    put(manager, 0)
    hit = manager.get(make_key(0))
    np.testing.assert_array_equal(values_of(hit), VALUES)
    assert hit is not None and hit.tier == "cpu"
    metrics = manager.metrics()
    assert (metrics["cpu"].lookups, metrics["cpu"].hits, metrics["cpu"].loads) == (1, 1, 1)
    assert metrics["disk"].lookups == 0
    assert manager.get(make_key("absent")) is None


def test_lower_tier_hit_is_promoted_to_tier_0(manager: StorageManager) -> None:
    for i in range(3):  # the CPU tier holds two: key 0 is evicted there, kept on disk
        put(manager, i)
    cpu, disk = manager.tiers
    assert not cpu.contains(make_key(0)) and disk.contains(make_key(0))
    hit = manager.get(make_key(0))
    np.testing.assert_array_equal(values_of(hit), VALUES)
    assert hit is not None and hit.tier == "disk"
    assert cpu.contains(make_key(0))
    again = manager.get(make_key(0))
    assert again is not None and again.tier == "cpu"
    metrics = manager.metrics()
    assert (metrics["cpu"].lookups, metrics["cpu"].hits) == (2, 1)
    assert (metrics["disk"].lookups, metrics["disk"].hits, metrics["disk"].bytes_out) == (1, 1, ENTRY_SIZE)
    assert metrics["cpu"].evictions == 2  # key 0 by key 2, then key 1 by the promotion


def test_metrics_snapshot_is_a_plain_copy(manager: StorageManager) -> None:
    put(manager, 0)
    manager.get(make_key(0))
    snapshot = manager.metrics_snapshot()
    assert set(snapshot) == {"cpu", "disk"}
    expected_counters = {
        "lookups", "hits", "hit_tokens", "bytes_in", "bytes_out", "loads", "load_seconds", "saves",
        "save_seconds", "evictions", "corrupt_dropped", "failed_puts", "errors",
    }  # fmt: skip
    assert set(snapshot["cpu"]) == expected_counters
    assert all(type(value) is float for counters in snapshot.values() for value in counters.values())
    assert snapshot["cpu"]["loads"] == 1 and snapshot["cpu"]["load_seconds"] > 0
    manager.metrics()["cpu"].hit_tokens += 256  # the connector's share
    assert snapshot["cpu"]["hit_tokens"] == 0  # a copy, not a view
    assert manager.metrics_snapshot()["cpu"]["hit_tokens"] == 256


def test_prefix_lookup_stops_at_the_first_gap(manager: StorageManager) -> None:
    keys = [make_key(i) for i in range(5)]
    for i in (0, 1, 3, 4):
        put(manager, i)
    assert manager.lookup_prefix(keys) == 2
    put(manager, 2)
    assert manager.lookup_prefix(keys) == 5  # keys 0 and 1 now live only on disk: any tier counts
    assert manager.lookup_prefix([make_key("absent"), *keys]) == 0
    assert manager.lookup_prefix([]) == 0


def test_prefix_lookup_asks_each_tier_once_about_what_faster_tiers_lack() -> None:
    fast, slow = CPUTier(10 * ENTRY_SIZE), BatchingTier(10 * ENTRY_SIZE)
    manager = StorageManager([fast, slow])
    keys = [make_key(i) for i in range(6)]
    for i in range(4):
        slow.put(keys[i], make_entry(keys[i]))
    fast.put(keys[0], make_entry(keys[0]))
    assert manager.lookup_prefix(keys) == 4
    assert slow.calls == ["contains_many(5)"]  # one batch, without the key tier 0 had
    assert (manager.metrics()["batching"].lookups, manager.metrics()["batching"].hits) == (5, 3)
    manager.close()


def test_corrupt_entry_is_dropped_and_the_next_tier_serves(tmp_path: Path) -> None:
    cpu = CPUTier(10 * ENTRY_SIZE)
    disk = DiskTier(tmp_path, 10 * ENTRY_SIZE)
    manager = StorageManager([cpu, disk])
    put(manager, 0)
    good = cpu.get(make_key(0))
    assert good is not None
    cpu.remove(make_key(0))
    cpu.put(make_key(0), good[:-1] + bytes([good[-1] ^ 1]))  # memory corrupted behind the store's back
    hit = manager.get(make_key(0))
    np.testing.assert_array_equal(values_of(hit), VALUES)
    assert hit is not None and hit.tier == "disk"
    assert manager.metrics()["cpu"].corrupt_dropped == 1
    assert cpu.get(make_key(0)) == good  # replaced by the promotion of the disk copy
    manager.close()


def test_entries_are_checked_once_per_read(manager: StorageManager, monkeypatch: pytest.MonkeyPatch) -> None:
    import pagoda.kvstore.storage_manager as storage_manager_module

    for i in range(3):  # key 0 only on disk
        put(manager, i)
    calls: list[CacheEngineKey] = []
    real_decode = storage_manager_module.decode_entry

    def counting_decode(data: bytes, key: CacheEngineKey):  # type: ignore[no-untyped-def]
        calls.append(key)
        return real_decode(data, key)

    monkeypatch.setattr(storage_manager_module, "decode_entry", counting_decode)
    assert manager.get(make_key(0)) is not None
    assert calls == [make_key(0)]


def test_a_failing_tier_is_skipped_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    manager = StorageManager([CPUTier(10 * ENTRY_SIZE), BrokenTier()])
    with caplog.at_level(logging.WARNING, logger="pagoda.kvstore"):
        assert manager.put(make_key(0), VALUES, VALUES.shape, "float32") == 1
        manager.tiers[0].remove(make_key(0))
        manager.put(make_key(1), VALUES, VALUES.shape, "float32")
        assert manager.get(make_key(0)) is None  # only the broken tier could have had it
        assert manager.get(make_key(1)) is not None
        assert manager.lookup_prefix([make_key(1), make_key(0)]) == 1
        assert manager.remove(make_key(1)) == 1
        manager.prefetch([make_key(0)])
        manager.flush()
    broken = manager.metrics()["broken"]
    assert broken.failed_puts == 2
    assert broken.errors == 6  # two puts, a get, a contains_many, a remove, the prefetch's get
    assert [record.getMessage().split(" (")[0] for record in caplog.records] == ["KV store: tier broken failed"]
    manager.close()


def test_readonly_tier_is_read_but_never_written_or_removed(tmp_path: Path) -> None:
    shared = DiskTier(tmp_path, 10 * ENTRY_SIZE)
    shared.put(make_key("warm"), make_entry(make_key("warm")))
    manager = StorageManager([CPUTier(10 * ENTRY_SIZE), shared], readonly=["disk"])
    assert manager.put(make_key("new"), VALUES, VALUES.shape, "float32") == 1
    manager.flush()
    assert not shared.contains(make_key("new"))
    hit = manager.get(make_key("warm"))
    assert hit is not None and hit.tier == "disk"
    assert manager.remove(make_key("warm")) == 1  # the CPU copy from the promotion; the frozen tier keeps its own
    assert shared.contains(make_key("warm"))
    manager.close()


def test_corrupt_entry_in_a_readonly_tier_is_dropped_from_the_read_but_kept(tmp_path: Path) -> None:
    shared = CPUTier(10 * ENTRY_SIZE)
    good = make_entry(make_key(0))
    shared.put(make_key(0), good[:-1] + bytes([good[-1] ^ 1]))
    manager = StorageManager([shared], readonly=["cpu"])
    assert manager.get(make_key(0)) is None
    assert shared.contains(make_key(0)) and manager.metrics()["cpu"].corrupt_dropped == 1
    manager.close()


def test_writeonly_tier_is_written_but_never_read(tmp_path: Path) -> None:
    warmed = DiskTier(tmp_path, 10 * ENTRY_SIZE)
    manager = StorageManager([CPUTier(ENTRY_SIZE), warmed], writeonly=["disk"])
    put(manager, 0)
    put(manager, 1)  # evicts key 0 from the CPU tier
    assert warmed.contains(make_key(0)) and warmed.contains(make_key(1))
    assert manager.get(make_key(0)) is None
    assert manager.lookup_prefix([make_key(1), make_key(0)]) == 1
    assert manager.metrics()["disk"].lookups == 0
    assert manager.remove(make_key(0)) == 1  # writers may remove what they wrote
    manager.close()


def test_promotion_skips_a_frozen_or_bypassed_tier_0(tmp_path: Path) -> None:
    front, back = CPUTier(10 * ENTRY_SIZE), DiskTier(tmp_path, 10 * ENTRY_SIZE)
    back.put(make_key(0), make_entry(make_key(0)))
    manager = StorageManager([front, back], readonly=["cpu"])
    hit = manager.get(make_key(0))
    assert hit is not None and hit.tier == "disk"
    manager.prefetch([make_key(0)])
    manager.flush()
    assert not front.contains(make_key(0))
    manager.close()


def test_prefetch_promotes_lower_tier_keys_in_the_background(manager: StorageManager) -> None:
    for i in range(3):  # keys 0 only on disk, 1 and 2 in both
        put(manager, i)
    cpu = manager.tiers[0]
    started = time.perf_counter()
    manager.prefetch([make_key(0), make_key("absent")])
    assert time.perf_counter() - started < 0.5
    manager.flush()
    assert cpu.contains(make_key(0))
    hit = manager.get(make_key(0))
    assert hit is not None and hit.tier == "cpu"
    assert manager.metrics()["disk"].loads == 1


def test_tier_names_and_flags_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tiers must name at least one"):
        StorageManager([])
    with pytest.raises(ValueError, match="unique"):
        StorageManager([CPUTier(ENTRY_SIZE), CPUTier(ENTRY_SIZE)])
    with pytest.raises(ValueError, match=r"readonly names tiers that do not exist: \['disk'\]"):
        StorageManager([CPUTier(ENTRY_SIZE)], readonly=["disk"])
    with pytest.raises(ValueError, match="both readonly and writeonly"):
        StorageManager([CPUTier(ENTRY_SIZE)], readonly=["cpu"], writeonly=["cpu"])
