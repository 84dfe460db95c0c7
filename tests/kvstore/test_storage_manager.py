"""Storage manager: write-through, promotion to tier 0, prefix lookup, corrupt and failing tiers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from kvstore_helpers import make_entry, make_key

from pagoda.kvstore.entry import entry_to_numpy
from pagoda.kvstore.keys import CacheEngineKey
from pagoda.kvstore.storage_manager import StorageManager
from pagoda.kvstore.tiers.base import StorageTier
from pagoda.kvstore.tiers.cpu import CPUTier
from pagoda.kvstore.tiers.disk import DiskTier

ENTRY_SIZE = len(make_entry(make_key(0)))
VALUES = np.arange(16, dtype=np.float32)


class BrokenTier(StorageTier):
    """A remote tier that is down: every call raises a connection error."""

    name = "broken"
    is_local = False
    supports_async_put = False

    def contains(self, key: CacheEngineKey) -> bool:
        raise ConnectionError("connection refused")

    def get(self, key: CacheEngineKey) -> bytes | None:
        raise ConnectionError("connection refused")

    def put(self, key: CacheEngineKey, entry: bytes) -> bool:
        raise ConnectionError("connection refused")

    def remove(self, key: CacheEngineKey) -> bool:
        raise ConnectionError("connection refused")

    def close(self) -> None:
        pass


@pytest.fixture
def manager(tmp_path: Path):
    store = StorageManager([CPUTier(2 * ENTRY_SIZE), DiskTier(tmp_path, 10 * ENTRY_SIZE)])
    yield store
    store.close()


def put(manager: StorageManager, name: object) -> None:
    manager.put(make_key(name), VALUES, VALUES.shape, "float32")
    manager.tiers[1].flush()  # type: ignore[attr-defined]


def test_put_writes_through_every_tier(manager: StorageManager) -> None:
    put(manager, 0)
    assert all(tier.contains(make_key(0)) for tier in manager.tiers)
    metrics = manager.metrics()
    assert metrics["cpu"].bytes_in == metrics["disk"].bytes_in == ENTRY_SIZE


def test_get_from_tier_0_is_bit_identical(manager: StorageManager) -> None:
    put(manager, 0)
    decoded = manager.get(make_key(0))
    assert decoded is not None
    np.testing.assert_array_equal(entry_to_numpy(decoded), VALUES)
    assert manager.metrics()["cpu"].hits == 1 and manager.metrics()["disk"].lookups == 0
    assert manager.get(make_key("absent")) is None


def test_lower_tier_hit_is_promoted_to_tier_0(manager: StorageManager) -> None:
    for i in range(3):  # the CPU tier holds two: key 0 is evicted there, kept on disk
        put(manager, i)
    cpu, disk = manager.tiers
    assert not cpu.contains(make_key(0)) and disk.contains(make_key(0))
    decoded = manager.get(make_key(0))
    assert decoded is not None
    np.testing.assert_array_equal(entry_to_numpy(decoded), VALUES)
    assert cpu.contains(make_key(0))
    metrics = manager.metrics()
    assert (metrics["cpu"].lookups, metrics["cpu"].hits) == (1, 0)
    assert (metrics["disk"].lookups, metrics["disk"].hits, metrics["disk"].bytes_out) == (1, 1, ENTRY_SIZE)
    assert metrics["cpu"].evictions == 2  # key 0 by key 2, then key 1 by the promotion


def test_prefix_lookup_stops_at_the_first_gap(manager: StorageManager) -> None:
    keys = [make_key(i) for i in range(5)]
    for i in (0, 1, 3, 4):
        put(manager, i)
    assert manager.lookup_prefix(keys) == 2
    put(manager, 2)
    assert manager.lookup_prefix(keys) == 5  # keys 0 and 1 now live only on disk: any tier counts
    assert manager.lookup_prefix([make_key("absent"), *keys]) == 0


def test_corrupt_entry_is_dropped_and_the_next_tier_serves(tmp_path: Path) -> None:
    cpu = CPUTier(10 * ENTRY_SIZE)
    disk = DiskTier(tmp_path, 10 * ENTRY_SIZE)
    manager = StorageManager([cpu, disk])
    put(manager, 0)
    good = cpu.get(make_key(0))
    assert good is not None
    cpu.remove(make_key(0))
    cpu.put(make_key(0), good[:-1] + bytes([good[-1] ^ 1]))  # memory corrupted behind the store's back
    decoded = manager.get(make_key(0))
    assert decoded is not None
    np.testing.assert_array_equal(entry_to_numpy(decoded), VALUES)
    assert manager.metrics()["cpu"].corrupt_dropped == 1
    assert cpu.get(make_key(0)) == good  # replaced by the promotion of the disk copy
    manager.close()


def test_a_failing_tier_is_skipped() -> None:
    manager = StorageManager([CPUTier(10 * ENTRY_SIZE), BrokenTier()])
    assert manager.put(make_key(0), VALUES, VALUES.shape, "float32") == 1
    assert manager.metrics()["broken"].failed_puts == 1
    assert manager.get(make_key(0)) is not None
    assert manager.get(make_key(1)) is None
    assert manager.lookup_prefix([make_key(0), make_key(1)]) == 1
    assert manager.remove(make_key(0)) == 1
    manager.close()


def test_needs_a_tier() -> None:
    with pytest.raises(ValueError, match="tiers"):
        StorageManager([])
