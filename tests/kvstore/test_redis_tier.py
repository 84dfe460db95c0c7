"""Redis tier on a real redis-server: round trip, namespaces, sharing, outages and reconnects, corrupt entries."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import numpy as np
import pytest
import redis
from kvstore_helpers import make_entry, make_key
from redis_server import RedisServer

from pagoda.kv_store_spec import parse_kv_store_spec
from pagoda.kvstore.build import build_storage_manager
from pagoda.kvstore.entry import entry_to_numpy
from pagoda.kvstore.storage_manager import StorageManager
from pagoda.kvstore.tiers.redis import RedisTier

ENTRY_SIZE = len(make_entry(make_key(0)))
VALUES = np.arange(16, dtype=np.float32)
RETRY_S = 0.3


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client, to look at and tamper with what the tier stored."""
    plain = redis.Redis.from_url(redis_server.url)
    yield plain
    plain.close()


def test_round_trip(redis_server: RedisServer) -> None:
    tier = RedisTier(redis_server.url)
    keys = [make_key(i) for i in range(3)]
    assert tier.put(keys[0], make_entry(keys[0])) and tier.put(keys[2], make_entry(keys[2]))
    assert tier.get(keys[0]) == make_entry(keys[0])
    assert tier.get(keys[1]) is None
    assert tier.contains(keys[0]) and not tier.contains(keys[1])
    assert tier.contains_many(keys) == [True, False, True]
    assert tier.contains_many([]) == []
    assert tier.remove(keys[0]) and not tier.remove(keys[0])
    assert tier.get(keys[0]) is None
    tier.close()


def test_keys_are_namespaced(redis_server: RedisServer, client: redis.Redis) -> None:
    team_a, team_b = RedisTier(redis_server.url, "team-a"), RedisTier(redis_server.url, "team-b")
    key = make_key(0)
    assert team_a.put(key, make_entry(key))
    assert not team_b.contains(key) and team_b.get(key) is None
    assert client.keys("*") == [f"team-a:{key.to_string()}".encode()]
    assert RedisTier(redis_server.url, "team-a").get(key) == make_entry(key)


def test_two_engines_share_kv_through_redis(redis_server: RedisServer) -> None:
    spec = parse_kv_store_spec(f"cpu:1MiB,{redis_server.url}+namespace=shared")
    writer, reader = build_storage_manager(spec), build_storage_manager(spec)
    writer.put(make_key(0), VALUES, VALUES.shape, "float32")
    assert reader.lookup_prefix([make_key(0), make_key(1)]) == 1
    hit = reader.get(make_key(0))
    assert hit is not None and hit.tier == "redis"
    np.testing.assert_array_equal(entry_to_numpy(hit.entry), VALUES)
    again = reader.get(make_key(0))
    assert again is not None and again.tier == "cpu"  # promoted on the first read
    snapshot = reader.metrics_snapshot()["redis"]
    assert (snapshot["loads"], snapshot["bytes_out"]) == (1, ENTRY_SIZE)
    writer.close()
    reader.close()


def test_a_warming_engine_writes_and_a_frozen_reader_only_reads(redis_server: RedisServer, client: redis.Redis) -> None:
    warmer = build_storage_manager(parse_kv_store_spec(f"cpu:1MiB,{redis_server.url}+writeonly"))
    reader = build_storage_manager(parse_kv_store_spec(f"cpu:1MiB,{redis_server.url}+readonly"))
    warmer.put(make_key(0), VALUES, VALUES.shape, "float32")
    warmer.tiers[0].remove(make_key(0))
    assert warmer.get(make_key(0)) is None  # the warmer never reads Redis
    reader.put(make_key(1), VALUES, VALUES.shape, "float32")
    assert client.dbsize() == 1  # the reader never writes it
    hit = reader.get(make_key(0))
    assert hit is not None and hit.tier == "redis"
    warmer.close()
    reader.close()


def test_outage_is_a_miss_with_one_warning_and_the_tier_comes_back(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    tier = RedisTier(redis_server.url, retry_interval_s=RETRY_S)
    manager = StorageManager([tier])
    key = make_key(0)
    assert manager.put(key, VALUES, VALUES.shape, "float32") == 1
    redis_server.stop()
    with caplog.at_level(logging.INFO, logger="pagoda.kvstore"):
        for _ in range(3):
            assert manager.get(key) is None
            assert manager.put(key, VALUES, VALUES.shape, "float32") == 0
            assert manager.lookup_prefix([key]) == 0
            assert manager.remove(key) == 0
        assert tier.is_down
        warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
        assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()
        assert redis_server.url in warnings[0].getMessage()

        redis_server.start()  # back, empty (nothing is persisted)
        assert manager.put(key, VALUES, VALUES.shape, "float32") == 0  # the retry is not due yet
        time.sleep(RETRY_S + 0.05)
        assert manager.put(key, VALUES, VALUES.shape, "float32") == 1
        assert not tier.is_down
        hit = manager.get(key)
        assert hit is not None and hit.tier == "redis"
    infos = [record.getMessage() for record in caplog.records if record.levelno == logging.INFO]
    assert len(infos) == 1 and "reconnected" in infos[0]
    assert len([record for record in caplog.records if record.levelno == logging.WARNING]) == 1
    metrics = manager.metrics()["redis"]
    assert metrics.failed_puts == 4 and metrics.errors == 0  # down is a miss, not an error
    manager.close()


def test_a_server_that_never_answers_costs_one_timeout_then_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel does) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        tier = RedisTier(f"redis://127.0.0.1:{port}/0", timeout_s=0.2, connect_timeout_s=0.2, retry_interval_s=60)
        with caplog.at_level(logging.WARNING, logger="pagoda.kvstore"):
            started = time.monotonic()
            assert tier.get(make_key(0)) is None
            first_call = time.monotonic() - started
            started = time.monotonic()
            assert not tier.put(make_key(0), make_entry(make_key(0)))
            assert tier.contains_many([make_key(0), make_key(1)]) == [False, False]
            later_calls = time.monotonic() - started
        tier.close()
    assert 0.15 < first_call < 1.5
    assert later_calls < 0.05  # down: no network until the retry is due
    assert len(caplog.records) == 1


def test_corrupt_entries_in_redis_are_dropped_and_counted(
    redis_server: RedisServer, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    tier = RedisTier(redis_server.url)
    manager = StorageManager([tier])
    flipped, wrong_key, truncated, good = (make_key(name) for name in ("flipped", "wrong", "truncated", "good"))
    entry = bytearray(make_entry(flipped))
    entry[-3] ^= 0x10
    client.set(tier.redis_key(flipped), bytes(entry))
    client.set(tier.redis_key(wrong_key), make_entry(good))  # a valid entry, for another key
    client.set(tier.redis_key(truncated), make_entry(truncated)[:-5])
    with caplog.at_level(logging.WARNING, logger="pagoda.kvstore"):
        for key in (flipped, wrong_key, truncated):
            assert manager.get(key) is None
            assert client.exists(tier.redis_key(key)) == 0  # dropped from the shared store too
    assert manager.metrics()["redis"].corrupt_dropped == 3
    assert len(caplog.records) == 1 and "checksum mismatch" in caplog.records[0].getMessage()
    manager.close()


def test_readonly_redis_keeps_a_corrupt_entry_but_never_serves_it(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    manager = build_storage_manager(parse_kv_store_spec(f"cpu:1MiB,{redis_server.url}+readonly"))
    redis_tier = manager.tiers[1]
    assert isinstance(redis_tier, RedisTier)
    client.set(redis_tier.redis_key(make_key(0)), b"PGKV garbage")
    assert manager.get(make_key(0)) is None and manager.get(make_key(0)) is None
    assert client.exists(redis_tier.redis_key(make_key(0))) == 1
    assert manager.metrics()["redis"].corrupt_dropped == 2
    manager.close()


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="must start with redis://"):
        RedisTier("http://127.0.0.1:6379/0")
    with pytest.raises(ValueError, match="namespace must not be empty"):
        RedisTier("redis://127.0.0.1:6379/0", "")
    with pytest.raises(ValueError, match="must be positive"):
        RedisTier("redis://127.0.0.1:6379/0", retry_interval_s=0)
